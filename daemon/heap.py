"""Giving the C heap's free memory back to the system once a model is unloaded.

A local model is read into memory, not mapped (``local.py``: a mapped file overwritten in place kills the
daemon with SIGBUS), so its weights are allocated by the C library's malloc, in the arena of whichever turn
thread loaded it. Freed, they stay resident as free space of that arena: a device alternating two models
that its memory budget cannot hold together grew by about a megabyte at every swap, for as long as it ran
(docs/reliability.md, "Clocks, long runs and signals"). ``malloc_trim`` hands every arena's free pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_LIBC = ctypes.util.find_library("c")


def _trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS): nothing to trim there."""
    try:
        return ctypes.CDLL(_LIBC).malloc_trim if _LIBC else None
    except (OSError, AttributeError):
        return None


_TRIM = _trimmer()


def release_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (a few milliseconds; after an unload only)."""
    if _TRIM is not None:
        _TRIM(0)
