"""A cloud call that its turn can leave the moment it is cancelled.

An endpoint that sends nothing holds the thread reading it for up to ``cloud.timeout_s`` a read, retries
included, until ``cloud.deadline_s``; a cancel (the client gone, the daemon's stop grace over) was seen only
at the stream's next chunk. A stop then outlasted systemd's TimeoutStopSec (40 s), and the turn, killed,
was recorded ``interrupted`` without a word to its client. So the call runs on a thread of its own while the
turn waits for it, looking at its cancel every ``LOOK_S``: once cancelled, the turn ends with what was
streamed, and the call, left to end by itself (at its next chunk, or its timeout: it is not retried),
sends nothing more.

A call left behind still holds a thread and a connection until it ends, and is no longer one of the turns
the queue limits count: at most ``LEFT_AT_MOST`` run at once, and past that a cancelled turn waits for its
call as before, so a client that asks and leaves in a loop cannot make the daemon hold more.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as NotYet

from locod.daemon.backends import Generation, Prompt

LOOK_S = 0.25
LEFT_AT_MOST = 64


@dataclasses.dataclass(frozen=True)
class Streamed:
    """What a call passed on to its turn before the turn left it: the deltas, and when the first came
    (``time.perf_counter``; None before any), which the turn's record keeps as its first token's latency."""

    parts: list[str]
    first: float | None


class _Call:
    """One call on its thread: its deltas passed on to the turn until the turn leaves it."""

    def __init__(self, on_delta: Callable[[str], None], room: threading.Semaphore) -> None:
        self._on_delta = on_delta
        self._room = room
        self._lock = threading.Lock()
        self._left = False
        self.outcome: Future[Generation] = Future()
        self.parts: list[str] = []
        self.first: float | None = None

    def run(self, call: Callable[[Prompt], Generation], prompt: Prompt) -> None:
        try:
            self.outcome.set_result(call(dataclasses.replace(prompt, on_delta=self._delta)))
        except Exception as exc:  # raised again on the turn's thread, as if it had made the call itself
            self.outcome.set_exception(exc)
        with self._lock:
            if self._left:
                self._room.release()

    def _delta(self, text: str) -> None:
        with self._lock:
            if not self._left:
                if self.first is None:
                    self.first = time.perf_counter()
                self.parts.append(text)
                self._on_delta(text)

    def leave(self) -> Streamed | None:
        """Stop passing deltas on, and say what was passed; None when the call has ended meanwhile or too
        many calls are left running already (the turn then waits for this one)."""
        with self._lock:
            if self.outcome.done() or not self._room.acquire(blocking=False):
                return None
            self._left = True
            return Streamed(list(self.parts), self.first)


def run_leaving_on_cancel(
    call: Callable[[Prompt], Generation],
    prompt: Prompt,
    left: Callable[[Streamed], Generation],
    room: threading.Semaphore,
) -> Generation:
    """``call(prompt)`` on a thread of its own (a daemon thread: an exit does not wait for a silent
    endpoint); ``left(what was streamed)`` is the generation of a turn cancelled before the call ended;
    ``room`` counts the calls left running."""
    running = _Call(prompt.on_delta, room)
    threading.Thread(target=running.run, args=(call, prompt), name="cloud-call", daemon=True).start()
    while True:
        try:
            return running.outcome.result(timeout=LOOK_S)
        except NotYet:
            if prompt.cancelled.is_set() and (streamed := running.leave()) is not None:
                return left(streamed)
