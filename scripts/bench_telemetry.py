#!/usr/bin/env python3
"""Telemetry cost: the sampler's CPU time at its 1 Hz default as a fraction of one core, and the per-turn
snapshot read, measured on this machine's real /sys and /proc, beside the time of one local token in the
same run (the embedded model, greedy).

    python scripts/bench_telemetry.py [--samples 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from pathlib import Path

from llama_cpp import Llama

from locod.daemon.config import load_config
from locod.daemon.fetch import fetch
from locod.daemon.telemetry import TelemetrySampler


class NoBackend:
    upload_bps = None
    answered = 0
    unreachable = 0
    tokens_per_s = None

    def reached(self, hop: tuple[str, int], since: float) -> None:
        pass  # no breakers to end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    sampler = TelemetrySampler(load_config(env={}), NoBackend(), NoBackend())
    sampler.sample()
    cpu = []
    for _ in range(args.samples):
        started = time.thread_time()
        sampler.sample()
        cpu.append(time.thread_time() - started)
    reads = 1_000_000
    read_s = timeit.timeit(sampler.snapshot, number=reads) / reads
    gguf = fetch("smollm2-135m-instruct", Path(__file__).resolve().parent.parent / "models", progress=lambda _: None)
    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    started = time.perf_counter()
    out = llm.create_completion("The history of the bicycle", max_tokens=64, temperature=0.0)
    per_token = (time.perf_counter() - started) / out["usage"]["completion_tokens"]  # type: ignore[index]
    interval = sampler.config.interval_s
    print("| measure | value |\n|---|---|")
    print(f"| one sample (CPU time, median of {args.samples}) | {statistics.median(cpu) * 1e3:.3f} ms |")
    print(
        f"| sampler at {1 / interval:.0f} Hz, fraction of one core (goal < 0.5 %) | "
        f"{statistics.median(cpu) / interval * 100:.3f} % |"
    )
    print(f"| per-turn snapshot read (goal < 5 us) | {read_s * 1e9:.0f} ns |")
    print(f"| one local token, same run | {per_token * 1e3:.1f} ms ({per_token / read_s:,.0f} snapshot reads) |")


if __name__ == "__main__":
    main()
