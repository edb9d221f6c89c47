#!/usr/bin/env python3
"""Bounded load test: N concurrent clients mixing local and cloud chat, status and feedback, some of them
slow readers, against the real daemon and a real OpenAI-compatible server on loopback, for a fixed number
of turns. Reports throughput, queue wait (request sent -> `decision` frame, which for a local turn is the
wait for the model) percentiles, per-client fairness and the daemon's resident memory over the run.

    python scripts/stress.py [--clients 50] [--turns 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from locod.client import Client
from locod.daemon.fetch import fetch
from locod.protocol import DoneFrame
from tests.conftest import start_cloud_server, start_daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--turns", type=int, default=1000)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    gguf = fetch("smollm2-135m-instruct", repo / "models", progress=lambda _: None)
    # One llama.cpp thread each: two spin-waiting pools sharing a small machine's cores starve each other.
    server = start_cloud_server(gguf, Path(tempfile.gettempdir()) / "locod-stress-cloud.log", n_threads=1)
    url = server.base_url
    config = {
        "local": {"max_tokens": 4, "n_threads": 1},
        "routing": {"explore_c": 0.0},
        "cloud": {"models": [{"name": "cloud-small", "base_url": url, "model": "cloud-small"}]},
    }
    waits: list[float] = []
    per_client: dict[int, int] = {}
    errors: list[str] = []
    remaining = [args.turns]
    lock = threading.Lock()
    rss: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as home:
        handle = start_daemon(Path(home), repo / "models", config)
        process = psutil.Process(handle.proc.pid)

        def client(n: int) -> None:
            with Client(handle.endpoint, turn_timeout_s=600) as c:
                while True:
                    with lock:
                        if remaining[0] <= 0:
                            return
                        remaining[0] -= 1
                        index = args.turns - remaining[0]
                    try:
                        force = "cloud" if index % 4 == 0 else "local"
                        started = time.perf_counter()
                        frames = c.chat(
                            f"client {n} turn {index}: say hi",
                            session=f"c{n}-{per_client.get(n, 0) // 5}",  # dialogues of five turns
                            force=force,
                            max_tokens=4,
                        )
                        decision = next(frames)
                        wait = time.perf_counter() - started
                        if n % 10 == 9:
                            time.sleep(0.2)  # a slow reader
                        done = list(frames)[-1]
                        assert isinstance(done, DoneFrame)
                        if index % 5 == 0:
                            c.status()
                        if index % 7 == 0:
                            c.feedback(done.decision, index % 2 == 0)
                        with lock:
                            waits.append(wait)
                            per_client[n] = per_client.get(n, 0) + 1
                            assert decision.type == "decision"
                    except Exception as exc:
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((len(waits), process.memory_info().rss / 2**20))
            if len(rss) % 60 == 0:
                print(f"{time.perf_counter() - started:.0f} s: {len(waits)} turns, RSS {rss[-1][1]:.0f} MB", flush=True)
            time.sleep(1.0)
        elapsed = time.perf_counter() - started
        rows = len(handle.rows())
        integrity = handle.rows("PRAGMA integrity_check")[0]["integrity_check"]
        handle.stop()
    server.proc.terminate()
    q = statistics.quantiles(waits, n=100)
    counts = sorted(per_client.values())
    print(f"{args.clients} clients, {args.turns} turns (1 in 4 cloud), {elapsed:.0f} s, errors: {len(errors)}")
    print("| measure | value |\n|---|---|")
    print(f"| turns answered / records written | {len(waits)} / {rows} (integrity_check {integrity}) |")
    print(f"| throughput | {len(waits) / elapsed:.1f} turns/s |")
    print(f"| queue wait p50 / p95 / p99 | {q[49]:.2f} s / {q[94]:.2f} s / {q[98]:.2f} s |")
    print(f"| turns per client min / median / max | {counts[0]} / {statistics.median(counts):.0f} / {counts[-1]} |")
    early = [m for done, m in rss if done <= args.turns * 0.2]
    late = [m for done, m in rss if done >= args.turns * 0.8]
    if early and late:
        print(
            f"| daemon RSS at 20 % / 80 % of the turns / peak | {max(early):.0f} MB / {max(late):.0f} MB / "
            f"{max(m for _, m in rss):.0f} MB |"
        )
    for line in errors[:5]:
        print("error:", line)


if __name__ == "__main__":
    main()
