#!/usr/bin/env python3
"""Time to first token when dialogues take turns: K dialogues interleaved round-robin, each turn's time from
request to the first `delta` frame, through a daemon with the dialogue cache (local.cache_mb at its default)
and a daemon without it (local.cache_mb = 0: what every daemon did before the cache). Both run at once and
take the same turn one after the other, so a slow phase of a shared machine hits both alike.

    python scripts/bench_sessions.py [--ks 1,2,4,8] [--baseline-ks 1,4] [--turns 10] [--max-tokens 24]

Prints, per K and cache setting, the median first-token time of each turn over the K dialogues, the ratio
of turns 6-10 to turns 2-3 (the goal: at most 1.3 with 4 dialogues), and the memory one kept dialogue takes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from locod.daemon.fetch import fetch
from locod.protocol import DeltaFrame, DoneFrame
from tests.conftest import start_daemon

TOPICS = ["cats", "rivers", "bridges", "volcanoes", "bees", "tea", "glaciers", "violins"]


def first_token_ms(client: Any, prompt: str, session: str, max_tokens: int) -> tuple[float, int]:
    """Client-observed ms to the first delta, and the prompt tokens of the turn."""
    started, first, tokens = time.perf_counter(), None, 0
    for frame in client.chat(prompt, session=session, max_tokens=max_tokens, temperature=0.0, seed=1):
        if first is None and isinstance(frame, DeltaFrame):
            first = time.perf_counter()
        if isinstance(frame, DoneFrame):
            tokens = frame.tokens_in
    return ((first or time.perf_counter()) - started) * 1000, tokens


def run_k(clients: dict[str, Any], k: int, turns: int, max_tokens: int) -> dict[str, tuple[list[float], int]]:
    """Per client: the median first-token ms of each turn over K interleaved dialogues, and the prompt tokens
    of the last turn. The clients take each turn in alternating order."""
    times: dict[str, list[list[float]]] = {name: [[] for _ in range(turns)] for name in clients}
    tokens = dict.fromkeys(clients, 0)
    for t in range(turns):
        for d in range(k):
            topic = TOPICS[d % len(TOPICS)]
            prompt = f"Let's talk about {topic}. What are they?" if t == 0 else f"Tell me one more fact about {topic}."
            order = list(clients) if (t + d) % 2 == 0 else list(reversed(clients))
            for name in order:
                ms, tokens[name] = first_token_ms(clients[name], prompt, f"k{k}-d{d}", max_tokens)
                times[name][t].append(ms)
    return {name: ([statistics.median(x) for x in times[name]], tokens[name]) for name in clients}


def ratio(medians: list[float]) -> float:
    return statistics.median(medians[5:10]) / statistics.median(medians[1:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--baseline-ks", default="1,4", help="K values also run without the cache")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="local.n_threads (0: llama.cpp's defaults)")
    args = parser.parse_args()
    if args.turns < 6:
        parser.error("--turns must be at least 6 (the ratio compares turns 6-10 with turns 2-3)")
    baseline_ks = {int(k) for k in args.baseline_ks.split(",") if k}
    models = Path(__file__).resolve().parent.parent / "models"
    fetch("smollm2-135m-instruct", models, progress=lambda _: None)
    rows: list[tuple[int, str, list[float], int]] = []
    with tempfile.TemporaryDirectory() as home:
        handles = {
            label: start_daemon(
                Path(home) / str(cache_mb),
                models,
                {"routing": {"mode": "local"}, "local": {"cache_mb": cache_mb, "n_threads": args.threads}},
            )
            for label, cache_mb in (("cache", -1), ("no cache", 0))
        }
        clients = {label: handle.client() for label, handle in handles.items()}
        try:
            for client in clients.values():
                client.ask("warm up", max_tokens=4)
            for k in (int(k) for k in args.ks.split(",")):
                taking = {label: c for label, c in clients.items() if label == "cache" or k in baseline_ks}
                for label, (medians, tokens) in run_k(taking, k, args.turns, args.max_tokens).items():
                    rows.append((k, label, medians, tokens))
            cache = clients["cache"].status()["local"]["cache"]
        finally:
            for handle in handles.values():
                handle.stop()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"local.n_threads {args.threads}, max_tokens {args.max_tokens}; dialogue cache limit (default, "
        f"sized from the model and free memory) {cache['limit_mb']:.0f} MB"
    )
    turns = range(1, args.turns + 1)
    print("| K | cache | " + " | ".join(f"turn {t}" for t in turns) + " | turns 6-10 / 2-3 | last prompt, tokens |")
    print("|---|---|" + "---|" * (args.turns + 2))
    for k, label, medians, tokens in rows:
        cells = " | ".join(f"{m:.0f}" for m in medians)
        print(f"| {k} | {label} | {cells} | {ratio(medians):.2f} | {tokens} |")
    print(
        f"kept at the end: {cache['dialogues']} dialogues, {cache['mb']:.1f} MB "
        f"({cache['mb'] / max(1, cache['dialogues']):.1f} MB each); {cache['hits']} hits, {cache['misses']} misses"
    )


if __name__ == "__main__":
    main()
