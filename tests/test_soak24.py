"""Soak round 24: a daemon that runs for months must hold what it held after its warm-up, whatever the
number of turns. Bounds asserted by behaviour: what /proc says the daemon process holds after many more
turns than the warm-up took.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SWAPS = 20


def anonymous_mib(pid: int) -> float:
    """The process's resident anonymous memory (its heaps; not the mapped files), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


def test_alternating_two_models_the_budget_cannot_hold_together_keeps_the_memory_it_started_with(
    daemon_factory: Any, model_path: Path
) -> None:
    """A budget that holds one model at a time and turns that alternate two: each turn unloads one model and
    loads the other. The weights are read into memory (not mapped), by whichever turn thread loads them, and
    freed they stayed resident as that thread's malloc arena's free space: the daemon's heap grew by about a
    model's weights within 20 swaps (421 MiB resident against 298), and by a megabyte or so at each swap
    after, for as long as it ran. Unloading now gives the free pages back (daemon/heap.py)."""
    both = [{"name": name, "path": MODEL_FILE, "n_ctx": 1024} for name in ("a", "b")]  # one file, two names
    local = {"models": both, "memory_budget_mb": 220, "cache_mb": 0, "max_tokens": 2}
    daemon = daemon_factory({"local": local, "routing": {"mode": "local"}})
    client = daemon.client(turn_timeout_s=300)
    client.ask("hello", max_tokens=1)  # the default model, loaded at start, answers once: the warm-up
    before = anonymous_mib(daemon.proc.pid)
    for turn in range(SWAPS):
        assert client.ask(f"hello {turn}", model="ab"[turn % 2], max_tokens=1).done.outcome == "ok"
    assert client.status()["local"]["resident"] == ["b"]  # one at a time: every turn swapped the model
    grown = anonymous_mib(daemon.proc.pid) - before
    assert grown < model_path.stat().st_size / 2**20 / 2, f"the heap grew {grown:.0f} MiB over {SWAPS} model swaps"
