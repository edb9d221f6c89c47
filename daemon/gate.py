"""A fair gate: one local generation at a time, handed out round-robin across clients.

A client that queues ten turns waits behind one turn of every other waiting client, not all ten of its
own: no client starves another. Background work (shadow answers) takes the gate only when it is idle and
is told to stop the moment a client queues, so it never delays a user's turn by more than a token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class FairGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: OrderedDict[Hashable, deque[object]] = OrderedDict()
        self._preempt: threading.Event | None = None  # set when a client queues behind background work

    @contextmanager
    def slot(self, client: Hashable, cancelled: threading.Event | None = None) -> Iterator[bool]:
        """Wait for this client's turn; yields False (without the gate) if ``cancelled`` is set meanwhile."""
        ticket = object()
        granted = False
        with self._cond:
            self._waiting.setdefault(client, deque()).append(ticket)
            if self._preempt is not None:
                self._preempt.set()
            try:
                while self._busy or self._head() is not ticket:
                    if cancelled is not None and cancelled.is_set():
                        break
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
