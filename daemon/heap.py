"""The C heap of a daemon that runs for months: large blocks kept out of it, free pages given back.

Two ways glibc's malloc lets a long-running daemon's memory grow, each a no-op where the C library is not
glibc (musl, macOS: neither has these knobs, nor this behaviour to correct):

- Its mmap threshold is dynamic: a block above it is mmapped, and freeing one raises the threshold to that
  block's size (up to 32 MiB). The first saved KV state freed (daemon/kvcache.py: a few MiB to tens) lifted it,
  and from then on every state, and every other large buffer, was carved from the heap arenas, which they
  fragmented: the heap grew some 300 MB an hour under dialogues taking turns, evicted and restored
  (docs/reliability.md, "Clocks, long runs and signals"). ``pin_mmap_threshold`` holds it at glibc's own
  starting value, so a large block is mapped, and unmapped whole when freed.
- A local model is read into memory, not mapped (``local.py``: a mapped file overwritten in place kills the
  daemon with SIGBUS), so its weights are allocated in the arena of whichever turn thread loaded it. Freed,
  they stay resident as free space of that arena: a device alternating two models that its memory budget
  cannot hold together grew by about a megabyte at every swap. ``release_free_memory`` hands every arena's
  free pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h); setting it also switches the dynamic threshold off
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value (DEFAULT_MMAP_THRESHOLD_MIN), where it is meant to stay
# How a user sets the threshold themselves, read by glibc as the process starts: theirs wins.
THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
THRESHOLD_TUNABLE = "glibc.malloc.mmap_threshold"


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it alone has ``gnu_get_libc_version``), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


_GLIBC = _glibc()


def threshold_set_by_user(environ: Mapping[str, str]) -> bool:
    """Whether the environment the daemon started in set glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``,
    or the tunable in ``GLIBC_TUNABLES``)."""
    return THRESHOLD_VARIABLE in environ or THRESHOLD_TUNABLE in environ.get("GLIBC_TUNABLES", "")


def pin_mmap_threshold() -> None:
    """Hold glibc's mmap threshold at 128 KiB, before the model is loaded and the first KV state saved; left
    as the user set it, when they did."""
    if _GLIBC is None or threshold_set_by_user(os.environ):
        return
    if not _GLIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.warning("glibc refused an mmap threshold of %d bytes: the heap may grow under long runs", MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (a few milliseconds; after an unload only)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
