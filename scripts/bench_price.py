#!/usr/bin/env python3
"""What issue #18 adds to the per-turn decision: MessPlus.choose with the feed-forward price against the
paper's rule (policy/messplus.py at a commit before the price, loaded from git), in the same run, and the
answer-confidence step (features of a 24-token answer plus the confidence head). CPU time per call (the
mean over batches of 1,000, median of the batches), so that other processes on a shared machine do not
count.

    python scripts/bench_price.py [--baseline e68b180]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from locod.policy import confidence, messplus

REPO = Path(__file__).resolve().parent.parent
KEYS = ("local", "cloud", "cloud+0", "cloud+1", "cloud+0+1")


def baseline(commit: str) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:policy/messplus.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "messplus_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("messplus_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["messplus_before"] = module
    spec.loader.exec_module(module)
    return module


def per_call_us(step: Any, batches: int = 9, size: int = 1000) -> float:
    times = []
    for _ in range(batches):
        t0 = time.process_time()
        for _ in range(size):
            step()
        times.append((time.process_time() - t0) / size * 1e6)
    return statistics.median(times)


def choose_step(module: ModuleType, keys: tuple[str, ...]) -> Any:
    rng = random.Random(0)
    m = module.MessPlus({k: 0.5 for k in keys}, sla=0.7, v=50.0, explore_c=0.0, q_cap=50.0, rng=random.Random(1))
    turns = [
        ({k: 0.01 if k == "local" else rng.uniform(0.5, 1.0) for k in keys}, {k: rng.uniform(0.1, 0.95) for k in keys})
        for _ in range(500)
    ]
    state = {"i": 0}

    def step() -> None:
        costs, s_hat = turns[state["i"] % len(turns)]
        state["i"] += 1
        m.choose(costs, s_hat=s_hat)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="e68b180")
    args = parser.parse_args()
    before = baseline(args.baseline)
    print("| step | before (us) | after (us) | after / before |\n|---|---|---|---|")
    for keys in (KEYS[:2], KEYS):
        old, new = per_call_us(choose_step(before, keys)), per_call_us(choose_step(messplus, keys))
        print(f"| MessPlus.choose, {len(keys)} actions | {old:.1f} | {new:.1f} | {new / old:.1f} |")
    rng = random.Random(2)
    answer = confidence.Answer(
        "What is the plural of the word mouse? Answer with one word.",
        [f" w{i}" for i in range(24)],
        [-rng.expovariate(2.0) for _ in range(24)],
    )
    head = confidence.ConfidenceHead()
    conf_us = per_call_us(lambda: head.predict(0.4, confidence.features(answer, 24), "query"))
    print(f"| answer confidence (features + head), 24 tokens | - | {conf_us:.1f} | - |")


if __name__ == "__main__":
    main()
