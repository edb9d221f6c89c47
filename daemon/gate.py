"""A fair gate: one local generation at a time, handed out round-robin across clients.

A client that queues ten turns waits behind one turn of every other waiting client, not all ten of its
own: no client starves another. Background work (shadow answers) takes the gate only when it is idle and
is told to stop the moment a client queues, so it never delays a user's turn by more than a token.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from locod.protocol import QUEUED_EVERY_S


class FairGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: OrderedDict[Hashable, deque[object]] = OrderedDict()
        self._preempt: threading.Event | None = None  # set when a client queues behind background work

    @contextmanager
    def slot(
        self,
        client: Hashable,
        cancelled: threading.Event | None = None,
        on_wait: Callable[[int], None] | None = None,
    ) -> Iterator[bool]:
        """Wait for this client's turn; yields False (without the gate) if ``cancelled`` is set meanwhile.
        ``on_wait(ahead)`` is called (without the gate's lock) when the turn has to wait, each time the
        turns ahead of it change, and every ``QUEUED_EVERY_S`` while that stays so (its client's silence
        timer restarts)."""
        ticket = object()
        granted = False
        told: tuple[int, float] | None = None  # (turns ahead, when) last told
        with self._cond:
            self._waiting.setdefault(client, deque()).append(ticket)
            if self._preempt is not None:
                self._preempt.set()
            try:
                while self._busy or self._head() is not ticket:
                    if cancelled is not None and cancelled.is_set():
                        break
                    if on_wait is not None:
                        ahead, now = self._ahead(client, ticket), time.monotonic()
                        if told is None or told[0] != ahead or now - told[1] >= QUEUED_EVERY_S:
                            told = (ahead, now)
                            self._cond.release()  # the ticket stays queued; the loop looks again after
                            try:
                                on_wait(ahead)
                            finally:
                                self._cond.acquire()
                            continue
                    self._cond.wait(timeout=0.25)
                else:
                    granted = self._busy = True
            finally:
                self._drop(client, ticket)
                if client in self._waiting:
                    self._waiting.move_to_end(client)  # round-robin: others go first next time
                self._cond.notify_all()
        try:
            yield granted
        finally:
            if granted:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    @contextmanager
    def idle_slot(self, preempt: threading.Event) -> Iterator[bool]:
        """The gate at once if nobody holds it or waits for it, else False; while it is held, ``preempt`` is
        set as soon as a client queues (the holder stops at its next token)."""
        with self._cond:
            granted = not self._busy and not self._waiting
            if granted:
                self._busy, self._preempt = True, preempt
        try:
            yield granted
        finally:
            if granted:
                with self._cond:
                    self._busy, self._preempt = False, None
                    self._cond.notify_all()

    def _ahead(self, client: Hashable, ticket: object) -> int:
        """Turns that get the gate before ``ticket``: the one holding it, then round-robin the waiting ones,
        one of each client per round in the order clients are queued; ``ticket`` goes in round ``rounds``."""
        rounds = self._waiting[client].index(ticket)
        ahead, before = int(self._busy), True
        for other, queue in self._waiting.items():
            if other == client:
                ahead, before = ahead + rounds, False
            else:  # a client before this one has a turn in our round too; one after, only in earlier rounds
                ahead += min(len(queue), rounds + 1 if before else rounds)
        return ahead

    def _head(self) -> object | None:
        for queue in self._waiting.values():
            return queue[0]
        return None

    def _drop(self, client: Hashable, ticket: object) -> None:
        queue = self._waiting[client]
        queue.remove(ticket)
        if not queue:
            del self._waiting[client]

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._waiting.values())
