"""Memory round 31: KV states freed give their memory back, whatever the size of the states freed before.

glibc raises its mmap threshold to the size of each mmapped block freed (up to 32 MiB): once one saved KV
state was freed, the smaller states saved after it came from the heap arenas and stayed there, fragmented,
when freed. Under dialogues taking turns the daemon grew some 300 MB an hour (docs/reliability.md, "Clocks,
long runs and signals"). The daemon now holds the threshold where glibc starts it (daemon/heap.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from .conftest import write_config
from .test_soak24 import anonymous_mib

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GLIBC = sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION") is not None


def words(n: int) -> str:
    """Plain text of about 1.2 ``n`` prompt tokens for SmolLM2's tokenizer."""
    return " ".join(f"lighthouse{i % 50} logbook" for i in range(n // 4))


def heap_beyond_cache(daemon: Any, client: Any) -> float:
    """The daemon's anonymous memory less the KV states its dialogue cache holds (they come and go), MiB."""
    return anonymous_mib(daemon.proc.pid) - client.status()["local"]["cache"]["mb"]


@pytest.mark.skipif(not GLIBC, reason="glibc's dynamic mmap threshold is what this checks")
def test_kv_states_freed_after_a_larger_one_give_their_memory_back(daemon_factory: Any) -> None:
    """A large state saved and freed, then two smaller ones saved and evicted: the first had lifted glibc's
    mmap threshold above the others, which were carved from a heap arena and stayed resident once freed."""
    local = {"models": [{"name": "smol", "path": MODEL_FILE, "n_ctx": 2048}], "default": "smol", "cache_mb": 200}
    config = {"local": local, "routing": {"mode": "local"}}
    daemon = daemon_factory(config)
    client = daemon.client(turn_timeout_s=600)

    def turn(session: str, prompt: str = "hi") -> None:
        assert client.ask(prompt, session=session, max_tokens=1).done.outcome == "ok"

    # The warm-up: a prompt of no session (no state kept) as long as the longest context below, so that the
    # live KV cache's pages and llama.cpp's buffers are all touched before the measure starts.
    client.ask(words(1100), max_tokens=1)
    turn("other")
    before = heap_beyond_cache(daemon, client)
    turn("large", words(1000))  # its state ~28 MiB: under glibc's 32 MiB ceiling for the dynamic threshold
    turn("other")  # saves the large state
    turn("large")  # restores it: the saved copy is freed
    turn("smaller", words(600))  # saves the large state again; this one's is ~17 MiB
    turn("small", words(450))  # saves the smaller state; this one's is ~13 MiB
    turn("other")  # saves the small state
    assert client.status()["local"]["cache"]["dialogues"] == 3
    write_config(daemon.config_path, {**config, "local": {**local, "cache_mb": 0}})
    assert client.reload()["reloaded"]
    turn("other")  # evicts (frees) every state kept
    cache = client.status()["local"]["cache"]
    assert cache["dialogues"] == 0 and cache["evictions"] == 3, cache
    grown = heap_beyond_cache(daemon, client) - before
    assert grown < 20, f"three KV states saved and freed left the heap {grown:.0f} MiB larger"


# glibc's own malloc, free and mallinfo2 (2.33 and later): whether a 4 MiB block, asked for after an 8 MiB one
# was freed, was mapped on its own (the threshold held) or carved from the heap (the threshold raised).
MAPPED_AFTER_A_LARGER_FREE = """
import ctypes
from locod.daemon.heap import pin_mmap_threshold

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
pin_mmap_threshold()
libc.free(libc.malloc(8 << 20))
block = libc.malloc(4 << 20)
print(libc.mallinfo2().hblkhd >= 4 << 20)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's dynamic mmap threshold is what this checks")
@pytest.mark.parametrize(
    ("environment", "mapped"),
    [
        ({}, True),
        ({"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}, False),
        ({"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={32 << 20}"}, False),
    ],
)
def test_the_threshold_is_held_unless_the_environment_sets_its_own(environment: dict[str, str], mapped: bool) -> None:
    """In a process of its own, so this one's allocator is left as it was."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    ran = subprocess.run(
        [sys.executable, "-c", MAPPED_AFTER_A_LARGER_FREE],
        env={**env, **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout.split() == [str(mapped)]
