"""A small client for the daemon's socket; the ``locod`` CLI is a thin layer over it.

    with Client() as c:
        result = c.ask("What is the capital of France?", session="demo")
        print(result.text, result.done["location"])

Errors the daemon reports come back as the matching ``locod.errors`` class.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from locod.errors import DaemonNotRunning, LocodError, from_frame
from locod.protocol import request

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def attachment(path: str | Path, *, private: bool = False, kind: str | None = None) -> dict[str, Any]:
    """Read a file into a protocol attachment (the daemon never needs to open client paths)."""
    path = Path(path)
    kind = kind or ("image" if path.suffix.lower() in IMAGE_SUFFIXES else "document")
    return {"kind": kind, "name": path.name, "data": base64.b64encode(path.read_bytes()).decode(), "private": private}


@dataclass
class TurnResult:
    text: str
    decision: dict[str, Any]
    done: dict[str, Any]
    frames: list[dict[str, Any]] = field(default_factory=list)


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

    # -- raw frames ----------------------------------------------------------------------------------

    def send(self, op: str, **fields: Any) -> str:
        rid = uuid.uuid4().hex[:16]
        if self.secret is not None:
            fields["secret"] = self.secret
        self._sock.send(request(op, rid, **fields))
        return rid

    def frames(self, rid: str, timeout_ms: int) -> Iterator[dict[str, Any]]:
        """Replies to request ``rid`` until its last frame; raises the reported error on an error frame."""
        while True:
            if not self._sock.poll(timeout_ms, zmq.POLLIN):
                raise DaemonNotRunning(
                    f"locod daemon is not running at {self.endpoint} (no reply within "
                    f"{timeout_ms / 1000:.0f} s); start it with `locod serve`"
                )
            frame = json.loads(self._sock.recv())
            if frame.get("id") != rid:
                continue  # a late reply to an earlier, abandoned request
            if frame["type"] == "error":
                raise from_frame(frame.get("kind", "error"), frame.get("code", "error"), frame.get("message", ""))
            yield frame
            if frame["type"] in ("done", "result"):
                return

    def call(self, op: str, **fields: Any) -> Any:
        rid = self.send(op, **fields)
        for frame in self.frames(rid, self.timeout_ms):
            return frame["data"]
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
        attachments: list[dict[str, Any]] | None = None,
        **options: Any,
    ) -> Iterator[dict[str, Any]]:
        """Stream the frames of one turn: ``decision``, ``delta``..., (``fallback``), ``done``."""
        fields: dict[str, Any] = {"messages": messages} if messages is not None else {"prompt": prompt}
        if session is not None:
            fields["session"] = session
        if model is not None:
            fields["model"] = model
        if attachments:
            fields["attachments"] = attachments
        if options:
            fields["options"] = {k: v for k, v in options.items() if v is not None}
        rid = self.send("chat", **fields)
        yield from self.frames(rid, self.turn_timeout_ms)

    def ask(self, prompt: str, **kwargs: Any) -> TurnResult:
        """One whole turn: the answer text with its decision and done frames."""
        frames = list(self.chat(prompt, **kwargs))
        text = "".join(f["text"] for f in frames if f["type"] == "delta")
        decision = next((f for f in frames if f["type"] == "decision"), {})
        done = frames[-1]
        return TurnResult(text or done.get("text", ""), decision, done, frames)
