#!/usr/bin/env python3
"""What the OpenAI-compatible HTTP API costs beside the ZeroMQ socket: one daemon serving both, the same
prompts (greedy, same model) streamed through locod's own client and through the `openai` SDK in
alternating rounds; client-observed first-token time and tokens/s for each (prompt evaluation included).

    python scripts/bench_http.py [--rounds 4] [--max-tokens 64]
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

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from locod.client import Client
from locod.daemon.fetch import fetch
from locod.protocol import DeltaFrame, DoneFrame
from scripts.bench_daemon import PROMPTS
from tests.conftest import free_port, start_daemon

Run = tuple[float, int, float, float]


def zeromq(client: Client, prompt: str, max_tokens: int) -> Run:
    """(seconds to the first token, tokens, seconds in all) as the client saw them, and the seconds to the
    first token the daemon recorded (the difference is what the path adds)."""
    started, first, tokens, inside = time.perf_counter(), None, 0, 0.0
    for frame in client.chat(prompt, max_tokens=max_tokens, temperature=0.0, seed=1):
        if isinstance(frame, DeltaFrame) and first is None:
            first = time.perf_counter() - started
        elif isinstance(frame, DoneFrame):
            tokens, inside = frame.tokens_out, (frame.first_token_ms or 0.0) / 1000
    assert first is not None
    return first, tokens, time.perf_counter() - started, inside


def http(client: openai.OpenAI, prompt: str, max_tokens: int) -> Run:
    started, first, tokens, inside = time.perf_counter(), None, 0, 0.0
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].finish_reason:
            inside = (chunk.model_extra or {})["locod"]["first_token_ms"] / 1000
    assert first is not None
    return first, tokens, time.perf_counter() - started, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    models = Path(__file__).resolve().parent.parent / "models"
    fetch("smollm2-135m-instruct", models, progress=lambda _: None)
    port = free_port()
    results: dict[str, list[Run]] = {"zeromq": [], "http": []}
    with tempfile.TemporaryDirectory() as home:
        config = {"routing": {"mode": "local"}, "http": {"listen": f"127.0.0.1:{port}"}}
        handle = start_daemon(Path(home), models, config)
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        client = handle.client()
        try:
            for prompt in PROMPTS:  # warm up both paths and llama.cpp
                zeromq(client, prompt, 8)
                http(sdk, prompt, 8)
            for round_ in range(args.rounds):
                # The paths take turns, each over all four prompts, the other path two prompts ahead: no turn
                # follows its own prompt (llama.cpp would reuse that prompt's cache) and load spikes on the
                # machine hit both alike; which path goes first alternates by round.
                order = ["zeromq", "http"] if round_ % 2 == 0 else ["http", "zeromq"]
                for i in range(len(PROMPTS)):
                    for shift, path in enumerate(order):
                        prompt = PROMPTS[(i + 2 * shift) % len(PROMPTS)]
                        run = zeromq(client, prompt, args.max_tokens) if path == "zeromq" else None
                        results[path].append(run or http(sdk, prompt, args.max_tokens))
        finally:
            handle.stop()
    summary = {
        path: (
            statistics.median(r[0] for r in runs) * 1000,
            statistics.median(r[0] - r[3] for r in runs) * 1000,
            sum(r[1] for r in runs) / sum(r[2] for r in runs),
            sum(r[1] for r in runs),
        )
        for path, runs in results.items()
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| path | first token (median) | of which outside generation (median) | tokens/s | tokens |")
    print("|---|---|---|---|---|")
    for path, (first_ms, added_ms, tps, tokens) in summary.items():
        print(f"| {path} | {first_ms:.1f} ms | {added_ms:.1f} ms | {tps:.1f} | {tokens} |")
    (z_first, _, z_tps, _), (h_first, _, h_tps, _) = summary["zeromq"], summary["http"]
    print(f"| **HTTP / ZeroMQ** (goal >= 0.97) | speed {z_first / h_first:.3f} | | {h_tps / z_tps:.3f} | |")


if __name__ == "__main__":
    main()
