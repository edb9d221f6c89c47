"""What every backend is asked and what it answers, so local and cloud are interchangeable to a turn."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from locod.protocol import ChatOptions

OnDelta = Callable[[str], None]


@dataclass(frozen=True)
class Upload:
    """What a cloud turn sends beyond text, for accounting and the record."""

    images: int
    bytes: int


@dataclass(frozen=True)
class Checkpoint:
    """Answer locally, escalate if unsure: the local answer is held back until its first ``tokens`` tokens
    (all of it, if shorter) are judged by ``keep`` (their text and log-probs), then passed on, or dropped and
    the turn escalated. A client never sees text of an answer that is dropped."""

    tokens: int
    keep: Callable[[Sequence[str], Sequence[float]], bool]


@dataclass(frozen=True)
class Sampling:
    """The request's sampling settings beyond temperature and seed; one left None keeps the model's own."""

    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @classmethod
    def of(cls, options: ChatOptions) -> Sampling:
        return cls(options.top_p, options.frequency_penalty, options.presence_penalty)

    def given(self) -> dict[str, Any]:
        """The settings the request gave, by OpenAI's names (llama.cpp's too), for a backend's call."""
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class Prompt:
    """A fully assembled request for one backend: history already merged, attachments already prepared.
    ``fit`` returns it with the messages trimmed to the model and ``tokens_in`` counted where it can."""

    messages: list[dict[str, object]]
    max_tokens: int
    temperature: float | None  # None: the request gave none (a cloud endpoint keeps its own)
    seed: int | None
    on_delta: OnDelta
    cancelled: threading.Event = field(default_factory=threading.Event)
    upload: Upload = Upload(0, 0)
    tokens_in: int | None = None
    session: str | None = None  # the dialogue, whose kept state a local model starts from
    logprobs: bool = False  # a local model reports its answer's tokens and their log-probs
    checkpoint: Checkpoint | None = None  # local only: hold the answer back until it is judged
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    sampling: Sampling = Sampling()
    response_format: dict[str, Any] | None = None  # OpenAI's JSON mode or schema (ChatOptions'); None: text


@dataclass
class Generation:
    text: str
    tokens_in: int
    tokens_out: int
    first_token_ms: float | None
    total_ms: float
    cost_usd: float = 0.0
    cost_estimated: bool = False  # priced (in whole, or a cut stream's part) from characters: no believable usage
    energy_j: float = 0.0
    images_sent: int = 0
    bytes_up: int = 0
    cancelled: bool = False
    escalated: bool = False  # the checkpoint dropped the answer: the turn goes to the cloud
    cut: bool = False  # stopped before the model ended it (cancelled, or dropped at its checkpoint)
    finish_reason: str | None = None  # why the backend ended it: stop, length, or an endpoint's (content_filter)
    tokens: tuple[str, ...] = ()  # with ``Prompt.logprobs``: the answer's tokens,
    logprobs: tuple[float, ...] = ()  # and each one's log-probability


class Backend(Protocol):
    """Where a turn is answered. A turn takes a ``slot`` (the local model's fair gate; the cloud has no
    queue), has its prompt ``fit`` (which refuses, before the turn is accepted, what cannot be answered),
    then ``generate``s, streaming through ``prompt.on_delta``."""

    def slot(
        self, client: Hashable, cancelled: threading.Event, on_wait: Callable[[int], None] | None = None
    ) -> AbstractContextManager[bool]: ...

    def fit(self, model: str, prompt: Prompt) -> Prompt: ...

    def generate(self, model: str, prompt: Prompt) -> Generation: ...
