"""What every backend is asked and what it answers, so local and cloud are interchangeable to a turn."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

OnDelta = Callable[[str], None]


@dataclass(frozen=True)
class Prompt:
    """A fully assembled request for one backend: history already merged, attachments already prepared."""

    messages: list[dict[str, object]]
    max_tokens: int
    temperature: float
    seed: int | None
    on_delta: OnDelta
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Generation:
    text: str
    tokens_in: int
    tokens_out: int
    first_token_ms: float | None
    total_ms: float
    cost_usd: float = 0.0
    energy_j: float = 0.0
    images_sent: int = 0
    bytes_up: int = 0
    cancelled: bool = False
