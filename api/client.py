"""A small client for the daemon's socket; the ``locod`` CLI is a thin layer over it.

    with Client() as c:
        result = c.ask("What is the capital of France?", session="demo")
        print(result.text, result.done["location"])

Errors the daemon reports come back as the matching ``locod.errors`` class.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from locod.errors import DaemonNotRunning, LocodError
from locod.protocol import (
    DEFAULT_OPTIONS,
    LAST_FRAMES,
    Attachment,
    ChatOptions,
    ChatRequest,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    ErrorFrame,
    FallbackFrame,
    FeedbackRequest,
    Frame,
    Request,
    ResultFrame,
    SimpleRequest,
    decode_frame,
    encode_request,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def attachment(path: str | Path, *, private: bool = False, kind: str | None = None) -> Attachment:
    """Read a file into a protocol attachment (the daemon never needs to open client paths)."""
    path = Path(path)
    kind = kind or ("image" if path.suffix.lower() in IMAGE_SUFFIXES else "document")
    return Attachment(kind, path.name, data=path.read_bytes(), private=private)


@dataclass
class TurnResult:
    """One whole turn: the answer, and the frames that said where it ran and how it ended."""

    text: str
    decision: DecisionFrame
    done: DoneFrame
    fallback: FallbackFrame | None = None
    frames: list[Frame] = field(default_factory=list)

    @classmethod
    def of(cls, frames: list[Frame]) -> TurnResult:
        decision = next(f for f in frames if isinstance(f, DecisionFrame))
        done = frames[-1]
        assert isinstance(done, DoneFrame)
        fallback = next((f for f in frames if isinstance(f, FallbackFrame)), None)
        text = "".join(f.text for f in frames if isinstance(f, DeltaFrame))
        return cls(text or done.text or "", decision, done, fallback, frames)


def default_endpoint() -> str:
    from locod.daemon.config import load_config

    return load_config().ipc_endpoint


class Client:
    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 10.0,
        turn_timeout_s: float = 600.0,
        secret: str | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout_ms = int(timeout_s * 1000)
        self.turn_timeout_ms = int(turn_timeout_s * 1000)
        self.secret = secret
        if self.endpoint.startswith("ipc://") and not Path(self.endpoint[6:]).exists():
            raise self._not_running()
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def _not_running(self) -> DaemonNotRunning:
        return DaemonNotRunning(f"locod daemon is not running at {self.endpoint}; start it with `locod serve`")

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames --------------------------------------------------------------------------------------

    def send(self, request: Request) -> str:
        """Send without waiting; returns the id its frames carry (read them with ``frames``)."""
        self._sock.send(encode_request(request))
        return request.id

    def frames(self, rid: str, timeout_ms: int) -> Iterator[Frame]:
        """Replies to request ``rid`` until its last frame; raises the reported error on an error frame."""
        while True:
            if not self._sock.poll(timeout_ms, zmq.POLLIN):
                raise DaemonNotRunning(
                    f"locod daemon is not running at {self.endpoint} (no reply within "
                    f"{timeout_ms / 1000:.0f} s); start it with `locod serve`"
                )
            frame_id, frame = decode_frame(self._sock.recv())
            if frame_id != rid:
                continue  # a late reply to an earlier, abandoned request
            if isinstance(frame, ErrorFrame):
                raise frame.error()
            yield frame
            if frame.type in LAST_FRAMES:
                return

    def call(self, op: str, **fields: Any) -> Any:
        if op == "feedback":
            rid = self.send(FeedbackRequest(new_id(), fields["decision"], fields["satisfied"], self.secret))
        else:
            rid = self.send(SimpleRequest(new_id(), op, secret=self.secret, **fields))
        for frame in self.frames(rid, self.timeout_ms):
            if isinstance(frame, ResultFrame):
                return frame.data
        raise LocodError("the daemon closed the reply without a result")

    # -- operations ----------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return dict(self.call("ping"))

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def decisions(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(self.call("decisions", limit=limit))

    def feedback(self, decision: int, satisfied: bool) -> dict[str, Any]:
        return dict(self.call("feedback", decision=decision, satisfied=satisfied))

    def reload(self) -> dict[str, Any]:
        return dict(self.call("reload"))

    def chat(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        session: str | None = None,
        model: str | None = None,
        attachments: list[Attachment] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        force: str | None = None,
        stream: bool = True,
    ) -> Iterator[Frame]:
        """Stream the frames of one turn: ``decision``, ``delta``..., (``fallback``), ``done``. ``force``
        is "local" or "cloud"; an option left None takes the daemon's default."""
        if messages is None:
            messages = [{"role": "user", "content": prompt or ""}]
        options = ChatOptions(
            max_tokens=max_tokens,
            temperature=DEFAULT_OPTIONS.temperature if temperature is None else temperature,
            seed=seed,
            force=force,
            stream=stream,
        )
        request = ChatRequest(new_id(), messages, session, model, attachments or [], options, self.secret)
        rid = self.send(request)
        yield from self.frames(rid, self.turn_timeout_ms)

    def ask(self, prompt: str, **kwargs: Any) -> TurnResult:
        """One whole turn: the answer text with its decision and done frames."""
        return TurnResult.of(list(self.chat(prompt, **kwargs)))


def new_id() -> str:
    return uuid.uuid4().hex[:16]
