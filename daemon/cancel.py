"""A turn's cancel (the client left, the daemon is stopping), looked at between the steps of preparing its
attachments: decoding, ranking and the rest cannot be stopped midway, so each step is where it stops."""

from __future__ import annotations

import threading

from locod.errors import Busy


def check_cancelled(cancelled: threading.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise Busy("the turn was cancelled while its attachments were prepared", code="cancelled")
