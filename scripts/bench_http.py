#!/usr/bin/env python3
"""What the OpenAI-compatible HTTP API costs beside the ZeroMQ socket: one daemon serving both, the same
prompts (greedy, same model) streamed through locod's own client, through the `openai` SDK and through a
bare standard-library HTTP client, in rotating rounds; client-observed first-token time and tokens/s
for each (prompt evaluation included). A first-token ratio is ZeroMQ's time over the path's.

    python scripts/bench_http.py [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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


def sdk(client: openai.OpenAI, prompt: str, max_tokens: int) -> Run:
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


def http_raw(port: int, prompt: str, max_tokens: int) -> Run:
    """The same request read with the standard library: the HTTP path without the SDK's own cost."""
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens, inside = time.perf_counter(), None, 0, 0.0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    for line in conn.getresponse():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
            first = time.perf_counter() - started
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if "locod" in chunk:
            inside = chunk["locod"]["first_token_ms"] / 1000
    conn.close()
    assert first is not None
    return first, tokens, time.perf_counter() - started, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    models = Path(__file__).resolve().parent.parent / "models"
    fetch("smollm2-135m-instruct", models, progress=lambda _: None)
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        config = {"routing": {"mode": "local"}, "http": {"listen": f"127.0.0.1:{port}"}}
        handle = start_daemon(Path(home), models, config)
        client = handle.client()
        openai_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        paths: dict[str, Callable[[str, int], Run]] = {
            "zeromq (locod.client)": functools.partial(zeromq, client),
            "HTTP (openai SDK)": functools.partial(sdk, openai_client),
            "HTTP (http.client)": functools.partial(http_raw, port),
        }
        results: dict[str, list[Run]] = {name: [] for name in paths}
        try:
            for prompt in PROMPTS:  # warm up every path and llama.cpp
                for ask in paths.values():
                    ask(prompt, 8)
            for round_ in range(args.rounds):
                # The paths take turns over all four prompts, each a few prompts ahead of the one before: no
                # turn follows its own prompt (llama.cpp would reuse that prompt's cache) and load spikes on
                # the machine hit every path alike; which path goes first rotates by round.
                names = list(paths)[round_ % 3 :] + list(paths)[: round_ % 3]
                for i in range(len(PROMPTS)):
                    for shift, name in zip((0, 2, 3), names):
                        prompt = PROMPTS[(i + shift) % len(PROMPTS)]
                        results[name].append(paths[name](prompt, args.max_tokens))
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
    (baseline, (z_first, _, z_tps, _)), *others = summary.items()
    for name, (h_first, _, h_tps, _) in others:
        print(f"| **{name} / {baseline}** (goal >= 0.97) | {z_first / h_first:.3f} | | {h_tps / z_tps:.3f} | |")


if __name__ == "__main__":
    main()
