#!/usr/bin/env python3
"""How much the daemon costs on top of llama.cpp: tokens/s through the daemon vs. llama-cpp-python called
directly on the same prompts (greedy, same model and settings), in alternating rounds of one run; the time
to the first token of one short prompt (8 tokens, read to the end before the next call), daemon vs. direct,
in alternating rounds; and the `ping` round trip over ZeroMQ.

    python scripts/bench_daemon.py [--rounds 3] [--max-tokens 128] [--first-rounds 30] [--pings 2000]

The machine's load average is printed before and after: on a shared machine, compare only runs under
similar load, and the ratios within one run.
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

from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from locod.daemon.fetch import fetch
from locod.protocol import DeltaFrame
from tests.conftest import start_daemon

PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a robot learning to paint.",
    "List some tips for staying focused while studying.",
    "Describe the water cycle to a ten-year-old.",
]


def direct(llm: Llama, max_tokens: int) -> tuple[int, float]:
    tokens, started = 0, time.perf_counter()
    for prompt in PROMPTS:
        stream = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0, seed=1, stream=True
        )
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index,union-attr]
                tokens += 1
    return tokens, time.perf_counter() - started


def through_daemon(client: object, max_tokens: int) -> tuple[int, float, float]:
    """Tokens, client-observed seconds, and seconds the daemon itself spent generating."""
    tokens, inside, started = 0, 0.0, time.perf_counter()
    for prompt in PROMPTS:
        result = client.ask(prompt, max_tokens=max_tokens, temperature=0.0, seed=1)  # type: ignore[attr-defined]
        tokens += result.done.tokens_out
        inside += result.done.latency_ms / 1000
    return tokens, time.perf_counter() - started, inside


FIRST_PROMPT = "Name one primary colour."


def first_direct(llm: Llama) -> float:
    """ms from the call to its first content chunk; the answer is read to its end."""
    started, first = time.perf_counter(), None
    messages = [{"role": "user", "content": FIRST_PROMPT}]
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0, seed=1, stream=True):  # type: ignore[arg-type]
        if first is None and chunk["choices"][0]["delta"].get("content"):  # type: ignore[index,union-attr]
            first = time.perf_counter()
    return ((first or time.perf_counter()) - started) * 1000


def first_daemon(client: object) -> float:
    """ms from the request to its first `delta` frame; the answer is read to its `done`."""
    started, first = time.perf_counter(), None
    for frame in client.chat(FIRST_PROMPT, max_tokens=8, temperature=0.0, seed=1):  # type: ignore[attr-defined]
        if first is None and isinstance(frame, DeltaFrame):
            first = time.perf_counter()
    return ((first or time.perf_counter()) - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--first-rounds", type=int, default=30)
    parser.add_argument("--pings", type=int, default=2000)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    models = repo / "models"
    gguf = fetch("smollm2-135m-instruct", models, progress=lambda _: None)
    threads = max(1, (os.cpu_count() or 2) // 2)  # llama-cpp-python's default, which the daemon also uses
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, verbose=False)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as home:
        handle = start_daemon(Path(home), models, {"routing": {"mode": "local"}})
        client = handle.client()
        try:
            client.ask("warm up", max_tokens=4)
            direct(llm, 4)
            d_tokens = d_time = s_tokens = s_time = s_inside = 0.0
            for _ in range(args.rounds):
                t, s = direct(llm, args.max_tokens)
                d_tokens, d_time = d_tokens + t, d_time + s
                t, s, inside = through_daemon(client, args.max_tokens)
                s_tokens, s_time, s_inside = s_tokens + t, s_time + s, s_inside + inside
            firsts: dict[str, list[float]] = {"direct": [], "daemon": []}
            for _ in range(args.first_rounds):
                firsts["direct"].append(first_direct(llm))
                firsts["daemon"].append(first_daemon(client))
            rtts = []
            for _ in range(args.pings):
                started = time.perf_counter()
                client.ping()
                rtts.append((time.perf_counter() - started) * 1e3)
        finally:
            handle.stop()
    direct_tps, daemon_tps = d_tokens / d_time, s_tokens / s_time
    q = statistics.quantiles(rtts, n=100)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"llama.cpp threads {threads}; load average (1, 5, 15 min) before {_load(load_before)}, "
        f"after {_load(os.getloadavg())}"
    )
    print("| measure | value |\n|---|---|")
    print(f"| direct llama-cpp-python | {direct_tps:.1f} tokens/s ({int(d_tokens)} tokens) |")
    print(
        f"| through the daemon (ZeroMQ, decision, 2 SQLite commits per turn) | {daemon_tps:.1f} tokens/s "
        f"({int(s_tokens)} tokens) |"
    )
    print(f"| ratio daemon / direct | {daemon_tps / direct_tps:.3f} |")
    print(f"| daemon's own generation time / client-observed time | {s_inside / s_time:.4f} |")
    first_d, first_s = statistics.median(firsts["direct"]), statistics.median(firsts["daemon"])
    print(
        f"| first token, direct / through the daemon (median of {args.first_rounds}) | "
        f"{first_d:.1f} ms / {first_s:.1f} ms |"
    )
    print(f"| ratio daemon / direct, first token (goal <= 1.1) | {first_s / first_d:.3f} |")
    print(f"| ping round trip p50 / p99 ({args.pings} pings) | {q[49]:.3f} ms / {q[98]:.3f} ms |")


def _load(averages: tuple[float, float, float]) -> str:
    return " ".join(f"{a:.2f}" for a in averages)


if __name__ == "__main__":
    main()
