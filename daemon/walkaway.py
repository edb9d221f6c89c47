"""A cloud call that its turn can leave the moment it is cancelled.

An endpoint that sends nothing holds the thread reading it for up to ``cloud.timeout_s`` a read, retries
included, until ``cloud.deadline_s``; a cancel (the client gone, the daemon's stop grace over) was seen only
at the stream's next chunk. A stop then outlasted systemd's TimeoutStopSec (40 s), and the turn, killed,
was recorded ``interrupted`` without a word to its client. So the call runs on a thread of its own while the
turn waits for it, looking at its cancel every ``LOOK_S``: once cancelled, the turn ends with what was
streamed, and the call, left to end by itself (at its next chunk, or its timeout), sends nothing more.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as NotYet

from locod.daemon.backends import Generation, Prompt

LOOK_S = 0.25


class _Relay:
    """The call's deltas, passed on to the turn until it leaves."""

    def __init__(self, on_delta: Callable[[str], None]) -> None:
        self._on_delta = on_delta
        self._lock = threading.Lock()
        self._left = False
        self.parts: list[str] = []

    def delta(self, text: str) -> None:
        with self._lock:
            if not self._left:
                self.parts.append(text)
                self._on_delta(text)

    def leave(self) -> list[str]:
        """Stop passing deltas on; what was passed so far."""
        with self._lock:
            self._left = True
            return list(self.parts)


def run_leaving_on_cancel(
    call: Callable[[Prompt], Generation], prompt: Prompt, left: Callable[[list[str]], Generation]
) -> Generation:
    """``call(prompt)`` on a thread of its own (a daemon thread: an exit does not wait for a silent
    endpoint); ``left(deltas streamed)`` is the generation of a turn cancelled before the call ended."""
    relay = _Relay(prompt.on_delta)
    outcome: Future[Generation] = Future()

    def run() -> None:
        try:
            outcome.set_result(call(dataclasses.replace(prompt, on_delta=relay.delta)))
        except Exception as exc:  # raised again on the turn's thread, as if it had made the call itself
            outcome.set_exception(exc)

    threading.Thread(target=run, name="cloud-call", daemon=True).start()
    while True:
        try:
            return outcome.result(timeout=LOOK_S)
        except NotYet:
            if prompt.cancelled.is_set():
                return left(relay.leave())
