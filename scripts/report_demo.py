#!/usr/bin/env python3
"""Draw the `locod report` picture of docs/routing.md from a real run of the daemon.

The daemon runs the embedded model locally; `python -m llama_cpp.server` serves the same GGUF on loopback
as the "cloud" model (priced like a large hosted model, $15/$60 per million tokens in/out, with a daily
cap). Turns of the BIG-bench trace
go through the daemon at a steady pace; after each, the trace's label for the model that answered is sent
as user feedback (a stand-in for a person clicking good/bad). Then `locod report` draws the decision log.

    pip install '.[test,report]'
    python scripts/report_demo.py [--turns 60] [--pace 3] [--sla 0.7] [--weight-policy 0] [--out docs/img/report.png]

It ends by printing where the turns were answered, the satisfied share and the spend.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from locod.daemon.fetch import fetch
from tests.conftest import REPO, locod_command, start_cloud_server, start_daemon

TRACE = REPO / "policy" / "data" / "bigbench_trace.jsonl"
LOCAL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--pace", type=float, default=3.0, help="seconds between turns")
    parser.add_argument("--sla", type=float, default=0.7)
    parser.add_argument("--weight-policy", type=float, default=0.0, help="routing.weight_policy (0: MESS+ alone)")
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "report.png"))
    args = parser.parse_args()
    models = REPO / "models"
    gguf = fetch(LOCAL, models, progress=lambda _: None)
    rows = [json.loads(line) for line in TRACE.read_text().splitlines()[: args.turns]]
    with tempfile.TemporaryDirectory() as home:
        cloud = start_cloud_server(gguf, Path(home) / "cloud.log", n_threads=1)
        prices = {"usd_per_mtok_in": 15.0, "usd_per_mtok_out": 60.0}
        cloud_model = {"name": "cloud", "base_url": cloud.base_url, "model": cloud.model, **prices}
        config = {
            "local": {"n_threads": 1, "max_tokens": 16},
            "cloud": {"daily_cap_usd": 0.25, "models": [cloud_model]},
            # The picture is of MESS+ alone (--weight-policy 0), so that it shows the queue at work.
            "routing": {"sla": args.sla, "weight_policy": args.weight_policy},
        }
        daemon = start_daemon(Path(home) / "d", models, config)
        started = time.time()
        try:
            client = daemon.client()
            for row in rows:
                done = client.ask(row["prompt"], session=row["dialogue"], max_tokens=24, seed=1).done
                answered = LOCAL if done.location == "local" else "cloud"
                client.feedback(done.decision, bool(row["models"][answered]["satisfied"]))
                time.sleep(args.pace)
            minutes = int((time.time() - started) / 60) + 1
            command = locod_command("--config", str(daemon.config_path), "report", "--since", f"{minutes}m")
            subprocess.run([*command, "--out", str(Path(args.out).resolve())], env=daemon.env, check=True)
            summarise(daemon.rows())
        finally:
            daemon.stop()
            cloud.proc.terminate()
            cloud.proc.wait(30)


def summarise(rows: list[dict[str, object]]) -> None:
    where: dict[str, int] = {}
    for row in rows:
        key = f"{row['backend']} ({row['outcome']})"
        where[key] = where.get(key, 0) + 1
    satisfied = sum(bool(row["satisfied"]) for row in rows) / max(len(rows), 1)
    spent = sum(float(row["cost_usd"] or 0.0) for row in rows)  # type: ignore[arg-type]
    answered = ", ".join(f"{n} {key}" for key, n in sorted(where.items()))
    print(f"{len(rows)} turns: {answered}; satisfied {satisfied:.2f}; spent ${spent:.3f}")


if __name__ == "__main__":
    main()
