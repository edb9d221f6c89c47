#!/usr/bin/env python3
"""Issue #17's attacks, measured against the real daemon (docs/reliability.md, "Attacks, second pass").

Each attack runs at the size the issue reported, bounded in count and time, and prints what the daemon
did: its resident memory, how long the attack held a turn, what a bystander client saw meanwhile.

    python scripts/attacks.py [non_reading_client huge_prompt fifos symlink_race cloud_streams]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from locod.client import Client
from locod.errors import LocodError
from locod.protocol import Attachment, DeltaFrame
from tests.conftest import DaemonHandle, start_daemon
from tests.faultproxy import Fault, FaultProxy
from tests.hostile import outcomes, swapping

REPO = Path(__file__).resolve().parent.parent
MB = 2**20


def rss(handle: DaemonHandle) -> float:
    return psutil.Process(handle.proc.pid).memory_info().rss / MB


def report(name: str, **figures: Any) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)


def non_reading_client(home: Path) -> None:
    """600 `decisions limit=1000` requests over 1,000 records, never read."""
    first = start_daemon(home, REPO / "models", {"local": {"max_tokens": 2}})
    first.client().ask("Tell me about boats.", max_tokens=2)
    first.stop()
    conn = sqlite3.connect(home / "state" / "locod.db")
    columns = ", ".join(r[1] for r in conn.execute("PRAGMA table_info(decisions)") if r[1] != "id")
    for _ in range(999):
        conn.execute(f"INSERT INTO decisions ({columns}) SELECT {columns} FROM decisions WHERE id = 1")
    conn.commit()
    conn.close()
    handle = start_daemon(home, REPO / "models", {"local": {"max_tokens": 2}})
    try:
        reply = len(json.dumps(handle.client().decisions(1000)))
        before = rss(handle)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(handle.endpoint)
        for i in range(600):
            sock.send(json.dumps({"v": 1, "id": str(i), "op": "decisions", "limit": 1000}).encode())
        time.sleep(20)
        after = rss(handle)
        ping = handle.client().ping()["pong"]
        report(
            "non-reading client",
            reply_kB=reply // 1000,
            rss_before_MB=round(before),
            rss_after_MB=round(after),
            dropped="not reading its replies" in handle.log(),
            others_served=ping,
        )
        sock.close()
    finally:
        handle.stop()


BYSTANDER = """
import statistics, sys, time
from locod.client import Client
with Client(sys.argv[1]) as c:
    took = []
    for _ in range(8):
        t = time.perf_counter()
        c.ask("Hi", max_tokens=1)
        took.append(time.perf_counter() - t)
print(f"median {statistics.median(took):.2f} s, worst {max(took):.2f} s")
"""


def huge_prompt(home: Path) -> None:
    """A 30 MB forced-local prompt, while a bystander (another process) asks short local turns."""
    handle = start_daemon(home, REPO / "models", {"daemon": {"max_message_bytes": 40 * MB}})
    try:
        bystander = [sys.executable, "-c", BYSTANDER, handle.endpoint]
        alone = subprocess.run(bystander, capture_output=True, text=True, check=True).stdout.strip()
        with Client(handle.endpoint) as c:
            during = subprocess.Popen(bystander, stdout=subprocess.PIPE, text=True)
            started = time.perf_counter()
            try:
                c.ask("word " * (6 * MB), force="local", max_tokens=2)
                code = "answered"
            except LocodError as exc:
                code = exc.code
            refused = time.perf_counter() - started
            out, _ = during.communicate(timeout=300)
        report(
            "30 MB forced-local prompt",
            code=code,
            refused_in_s=round(refused, 2),
            bystander_alone=alone,
            during_attack=out.strip(),
        )
    finally:
        handle.stop()


def fifos(home: Path) -> None:
    allowed = home / "allowed"
    allowed.mkdir(parents=True)
    for i in range(256):
        os.mkfifo(allowed / f"pipe{i}")
    handle = start_daemon(home, REPO / "models", {"paths": {"allow_dirs": [str(allowed)]}, "local": {"max_tokens": 1}})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(handle.endpoint)
    for i in range(256):
        attachment = {"kind": "document", "path": str(allowed / f"pipe{i}")}
        sock.send(
            json.dumps({"v": 1, "id": str(i), "op": "chat", "prompt": "read", "attachments": [attachment]}).encode()
        )
    codes: dict[str, int] = {}
    for _ in range(256):
        if not sock.poll(30_000):
            break
        frame = json.loads(sock.recv())
        codes[frame.get("code", frame["type"])] = codes.get(frame.get("code", frame["type"]), 0) + 1
    served = handle.client().ask("Hi", max_tokens=1).done.outcome
    sock.close()
    started = time.perf_counter()
    code = handle.stop()
    report(
        "256 FIFO attachments",
        replies=codes,
        bystander=served,
        sigterm_exit=code,
        stop_s=round(time.perf_counter() - started, 1),
    )


def symlink_race(home: Path) -> None:
    allowed = home / "allowed"
    allowed.mkdir(parents=True)
    (allowed / "notes.md").write_text("The boat is blue.")
    secret = "outside " * 100
    (home / "outside.md").write_text(secret)
    (allowed / "swap").symlink_to(home / "outside.md")
    handle = start_daemon(home, REPO / "models", {"paths": {"allow_dirs": [str(allowed)]}, "local": {"max_tokens": 1}})
    document = [Attachment("document", "doc", path=str(allowed / "notes.md"))]
    with swapping(allowed / "notes.md", allowed / "swap") as swaps, Client(handle.endpoint) as c:
        counts = outcomes(c, 300, "boat?", attachments=document)
    leaked = sum(a["bytes"] == len(secret) for row in handle.rows() for a in json.loads(row["attachments_offered"]))
    handle.stop()
    report("symlink race, 300 turns", swaps=swaps[0], outcomes=counts, outside_file_read=leaked)


def cloud_streams(home: Path) -> None:
    proxy = FaultProxy("http://127.0.0.1:9").start()
    model = {"name": "cloud-small", "base_url": proxy.base_url, "model": "cloud-small"}
    cloud = {"timeout_s": 10.0, "deadline_s": 30.0, "max_retries": 0, "models": [model]}
    config = {"routing": {"mode": "cloud"}, "cloud": cloud}
    handle = start_daemon(home, REPO / "models", config)
    try:
        for fault, max_tokens in (
            (Fault("trickle", delay_s=1.0), 8),
            (Fault("endless"), 5),
            (Fault("huge_event", size=50 * MB), 8),
            (Fault("no_newline", size=512 * MB), 8),
        ):
            proxy.set(fault)
            before = rss(handle)
            started = time.perf_counter()
            result = handle.client(turn_timeout_s=900).ask("Say something.", max_tokens=max_tokens)
            fallback = result.fallback.cause if result.fallback else None
            deltas = [f for f in result.frames if isinstance(f, DeltaFrame)]
            report(
                f"cloud {fault.kind}",
                turn_s=round(time.perf_counter() - started, 1),
                outcome=result.done.outcome,
                cause=fallback,
                deltas=len(deltas),
                largest_delta=max((len(f.text) for f in deltas), default=0),
                rss_growth_MB=round(rss(handle) - before),
            )
    finally:
        handle.stop()
        proxy.stop()


def main() -> None:
    attacks = {a.__name__: a for a in (non_reading_client, huge_prompt, fifos, symlink_race, cloud_streams)}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attacks", nargs="*", metavar="ATTACK", help=f"one of {', '.join(attacks)} (default: all)")
    names = parser.parse_args().attacks
    if unknown := [name for name in names if name not in attacks]:  # a typo is refused, not taken for "all"
        parser.error(f"no attack named {', '.join(unknown)}: choose from {', '.join(attacks)}")
    chosen = [attacks[name] for name in names] or attacks.values()
    for attack in chosen:
        with tempfile.TemporaryDirectory() as home:
            attack(Path(home) / "d")


if __name__ == "__main__":
    main()
