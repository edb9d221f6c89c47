"""A fair gate: one local generation at a time, handed out round-robin across groups of clients, and
within a group across its clients.

A client that queues ten turns waits behind one turn of every other waiting client, not all ten of its
own: no client starves another. The daemon groups clients by door (``sessions.door_of``): a local user who
opens many connections to an unauthenticated door gets that door's share, not one share per connection
against the owner's one. Background work (shadow answers) takes the gate only when it is idle and
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
    def __init__(self, group: Callable[[Hashable], Hashable] = lambda client: client) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._group = group
        # group -> client -> its waiting tickets; the heads of both orders go next.
        self._waiting: OrderedDict[Hashable, OrderedDict[Hashable, deque[object]]] = OrderedDict()
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
            group = self._group(client)
            self._waiting.setdefault(group, OrderedDict()).setdefault(client, deque()).append(ticket)
            if self._preempt is not None:
                self._preempt.set()
            try:
                while self._busy or self._head() is not ticket:
                    if cancelled is not None and cancelled.is_set():
                        break
                    if on_wait is not None:
                        ahead, now = self._ahead(ticket), time.monotonic()
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
                self._drop(group, client, ticket)
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

    def _ahead(self, ticket: object) -> int:
        """Turns that get the gate before ``ticket``: the one holding it, then the waiting ones in the order
        they would be served (the queue is at most daemon.queue_limit long, so it is simply played out)."""
        groups = deque(deque(deque(queue) for queue in clients.values()) for clients in self._waiting.values())
        ahead = int(self._busy)
        while groups:
            clients = groups.popleft()
            queue = clients.popleft()
            if queue.popleft() is ticket:
                return ahead
            ahead += 1
            if queue:
                clients.append(queue)
            if clients:
                groups.append(clients)
        return ahead

    def _head(self) -> object | None:
        for clients in self._waiting.values():
            for queue in clients.values():
                return queue[0]
        return None

    def _drop(self, group: Hashable, client: Hashable, ticket: object) -> None:
        """Take ``ticket`` out; its client and group go behind the others (round-robin), or out when empty."""
        clients = self._waiting[group]
        clients[client].remove(ticket)
        if clients[client]:
            clients.move_to_end(client)
        else:
            del clients[client]
        if clients:
            self._waiting.move_to_end(group)
        else:
            del self._waiting[group]

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(q) for clients in self._waiting.values() for q in clients.values())
