"""scripts/embed_probe.py on a slice of the development trace, with the real embedded model: what it prints and
writes has the shape docs/routing.md reads its figures from (its numbers on a few dozen turns mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TURNS = 36
HEADS = {
    "hashed words (MESS+)",
    *(f"{head}, {pool}" for pool in ("mean", "last") for head in ("embedding", "words + embedding")),
}
FIGURES = {"fitted_auc", "fitted_within_task", "online_auc", "online_within_task"}


def probe(tmp_path: Path, model_path: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(REPO / "scripts/embed_probe.py"),
        *("--trace", str(REPO / "policy/data/bigbench_trace.jsonl"), "--limit", str(TURNS)),
        *("--model", str(model_path), "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "out.json")),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_embed_probe_reports_every_head_and_caches_the_embeddings(tmp_path: Path, model_path: Path) -> None:
    done = probe(tmp_path, model_path)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads((tmp_path / "out.json").read_text())
    assert result["trace"] == "bigbench_trace.jsonl" and result["turns"] == TURNS
    assert set(result["heads"]) == HEADS
    assert all(set(figures) == FIGURES for figures in result["heads"].values())
    assert result["embed_ms_mean"] > 0 and result["tokens_mean"] > 0
    rows = [line for line in done.stdout.splitlines() if line.startswith("| bigbench_trace.jsonl |")]
    assert len(rows) == len(HEADS)
    cached = {p.name.split(".")[-2]: np.load(p) for p in (tmp_path / "cache").glob("*.npy")}
    assert set(cached) == {"mean", "last", "ms", "tokens"}
    assert cached["mean"].shape == cached["last"].shape == (TURNS, 576)  # SmolLM2-135M's hidden size
    assert cached["tokens"].shape == (TURNS,) and cached["tokens"].min() > 0


def test_a_second_run_reads_the_cache(tmp_path: Path, model_path: Path) -> None:
    """The embeddings are made once per trace slice and GGUF: a second run leaves the cached files as they were."""
    assert probe(tmp_path, model_path).returncode == 0
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")}
    again = probe(tmp_path, model_path)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")} == made
