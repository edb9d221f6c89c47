"""Attack helpers shared by the tests and scripts/attacks.py."""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from locod.client import Client
from locod.errors import LocodError

RENAME_EXCHANGE, AT_FDCWD = 2, -100


@contextlib.contextmanager
def swapping(a: Path, b: Path, max_s: float = 1800) -> Iterator[list[int]]:
    """Exchange two names atomically (renameat2 RENAME_EXCHANGE) in a loop while the block runs, at most
    ``max_s``; yields a one-item list counting the swaps."""
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = libc.renameat2
    exchange.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    stop, swaps = threading.Event(), [0]

    def run() -> None:
        deadline = time.monotonic() + max_s
        while not stop.is_set() and time.monotonic() < deadline:
            swaps[0] += exchange(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), RENAME_EXCHANGE) == 0
            time.sleep(0.0002)  # leave the GIL to the threads that talk to the daemon

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield swaps
    finally:
        stop.set()
        thread.join(30)


def outcomes(client: Client, turns: int, prompt: str, **kwargs: Any) -> dict[str, int]:
    """Ask ``turns`` times; how many were answered ("ok") and how many refused, by error code."""
    counts: dict[str, int] = {}
    for _ in range(turns):
        try:
            client.ask(prompt, **kwargs)
            key = "ok"
        except LocodError as exc:
            key = exc.code
        counts[key] = counts.get(key, 0) + 1
    return counts
