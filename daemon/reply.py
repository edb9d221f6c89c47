"""Where a turn's frames go: one request's reply, whichever door it came through.

The socket door posts frames to the serving loop, the HTTP door to its response stream; the turn only
sends. ``cancelled`` is how the door tells the turn to stop, ``answered`` how the door (and ``status``)
know the turn has said its last frame.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from locod.protocol import DoneFrame, ErrorFrame, Frame


@dataclass
class Reply:
    """Frames for one request; ``cancelled`` is set when the client vanished or the daemon is stopping,
    ``answered`` once the last frame (``done`` or ``error``) has gone out."""

    post: Callable[[Frame], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "the client disconnected"
    request_id: str | None = None  # the socket request's id, which its frames carry (None: the HTTP door's)

    def send(self, frame: Frame) -> None:
        if isinstance(frame, DoneFrame | ErrorFrame):
            self.answered.set()  # before the frame leaves: a client that reads it may ask for status at once
        self.post(frame)
