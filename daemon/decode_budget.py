"""One memory budget for decoding images, shared by every turn in flight.

A small compressed file can decode to hundreds of megabytes (a 1 kB RLE bitmap, a 300 kB PNG of one
colour), so what bounds the daemon's memory is not the request size but how many such decodes run at once.
Each decode holds its estimated bytes for as long as it runs; one that does not fit waits for others to
finish (a turn that is cancelled meanwhile stops waiting), so memory stays within the budget whatever the
number of turns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from locod.errors import Busy


class DecodeBudget:
    def __init__(self) -> None:
        self._used = 0
        self._room = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int, capacity: int, cancelled: threading.Event | None = None) -> Iterator[None]:
        """Hold ``nbytes`` of ``capacity`` while decoding; a decode alone always runs (its size is checked
        against ``capacity`` before it asks)."""
        with self._room:
            while self._used and self._used + nbytes > capacity:
                if cancelled is not None and cancelled.is_set():
                    raise Busy("the turn was cancelled while waiting to decode an image", code="cancelled")
                self._room.wait(0.1)
            self._used += nbytes
        try:
            yield
        finally:
            with self._room:
                self._used -= nbytes
                self._room.notify_all()

    @property
    def used(self) -> int:
        with self._room:
            return self._used
