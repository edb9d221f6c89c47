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
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from locod.client import Client
from locod.daemon.fetch import fetch
from locod.protocol import DoneFrame
from tests.conftest import DaemonHandle, start_cloud_server, start_daemon


@dataclass
class Load:
    """The run's turns, handed out one at a time to the clients, and what they measured."""

    turns: int
    remaining: int = 0
    waits: list[float] = field(default_factory=list)  # request sent -> `decision` frame, seconds
    per_client: dict[int, int] = field(default_factory=dict)  # turns answered, by client
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.remaining = self.turns

    def take(self) -> int | None:
        """The next turn's index, or None when all have been handed out."""
        with self.lock:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
            return self.turns - self.remaining

    def client(self, endpoint: str, n: int) -> None:
        """Client ``n``: a dialogue of five turns after another, one in four forced to the cloud; every
        tenth client reads slowly; some turns also ask for status or give feedback."""
        with Client(endpoint, turn_timeout_s=600) as c:
            while (index := self.take()) is not None:
                try:
                    started = time.perf_counter()
                    frames = c.chat(
                        f"client {n} turn {index}: say hi",
                        session=f"c{n}-{self.per_client.get(n, 0) // 5}",
                        force="cloud" if index % 4 == 0 else "local",
                        max_tokens=4,
                    )
                    decision = next(frames)
                    wait = time.perf_counter() - started
                    if n % 10 == 9:
                        time.sleep(0.2)  # a slow reader
                    done = list(frames)[-1]
                    assert decision.type == "decision" and isinstance(done, DoneFrame)
                    if index % 5 == 0:
                        c.status()
                    if index % 7 == 0:
                        c.feedback(done.decision, index % 2 == 0)
                    with self.lock:
                        self.waits.append(wait)
                        self.per_client[n] = self.per_client.get(n, 0) + 1
                except Exception as exc:
                    with self.lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")


def run(load: Load, clients: int, handle: DaemonHandle) -> tuple[float, list[tuple[int, float]]]:
    """The clients' threads to their end: seconds taken, and (turns done, daemon RSS in MB) each second."""
    process = psutil.Process(handle.proc.pid)
    threads = [threading.Thread(target=load.client, args=(handle.endpoint, n)) for n in range(clients)]
    rss: list[tuple[int, float]] = []
    started = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((len(load.waits), process.memory_info().rss / 2**20))
        if len(rss) % 60 == 0:
            took = time.perf_counter() - started
            print(f"{took:.0f} s: {len(load.waits)} turns, RSS {rss[-1][1]:.0f} MB", flush=True)
        time.sleep(1.0)
    return time.perf_counter() - started, rss


def report(load: Load, clients: int, elapsed: float, rss: list[tuple[int, float]], rows: int, integrity: str) -> None:
    q = statistics.quantiles(load.waits, n=100)
    counts = sorted(load.per_client.values())
    print(f"{clients} clients, {load.turns} turns (1 in 4 cloud), {elapsed:.0f} s, errors: {len(load.errors)}")
    print("| measure | value |\n|---|---|")
    print(f"| turns answered / records written | {len(load.waits)} / {rows} (integrity_check {integrity}) |")
    print(f"| throughput | {len(load.waits) / elapsed:.1f} turns/s |")
    print(f"| queue wait p50 / p95 / p99 | {q[49]:.2f} s / {q[94]:.2f} s / {q[98]:.2f} s |")
    print(f"| turns per client min / median / max | {counts[0]} / {statistics.median(counts):.0f} / {counts[-1]} |")
    early = [m for done, m in rss if done <= load.turns * 0.2]
    late = [m for done, m in rss if done >= load.turns * 0.8]
    if early and late:
        print(
            f"| daemon RSS at 20 % / 80 % of the turns / peak | {max(early):.0f} MB / {max(late):.0f} MB / "
            f"{max(m for _, m in rss):.0f} MB |"
        )
    for line in load.errors[:5]:
        print("error:", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--turns", type=int, default=1000)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    gguf = fetch("smollm2-135m-instruct", repo / "models", progress=lambda _: None)
    # One llama.cpp thread each: two spin-waiting pools sharing a small machine's cores starve each other.
    server = start_cloud_server(gguf, Path(tempfile.gettempdir()) / "locod-stress-cloud.log", n_threads=1)
    config = {
        "local": {"max_tokens": 4, "n_threads": 1},
        "routing": {"explore_c": 0.0},
        "cloud": {"models": [{"name": "cloud-small", "base_url": server.base_url, "model": "cloud-small"}]},
    }
    load = Load(args.turns)
    with tempfile.TemporaryDirectory() as home:
        handle = start_daemon(Path(home), repo / "models", config)
        elapsed, rss = run(load, args.clients, handle)
        rows = len(handle.rows())
        integrity = handle.rows("PRAGMA integrity_check")[0]["integrity_check"]
        handle.stop()
    server.proc.terminate()
    report(load, args.clients, elapsed, rss, rows, integrity)


if __name__ == "__main__":
    main()
