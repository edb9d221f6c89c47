#!/usr/bin/env python3
"""Fit the warm-start predictor prior of a trace's local model on that replay trace (docs/routing.md) and
write it as <GGUF SHA-256>.npz (locod.policy.warmstart): into the state directory's priors/, which the
daemon reads before the shipped priors (and an upgrade of the package keeps), or with --out policy/priors,
the shipped one of the embedded model.

The MESS+ head is a logistic regression on the features the daemon computes for a turn (hashed n-grams and
dense features), fitted to the local model's real labels; the ConfidenceHead is fitted on the answers'
log-prob features with the prompt-only s_hat predicted out of fold (2 folds), as the daemon will see it: from
a head that has not seen that turn.

    python scripts/fit_prior.py --trace mine_trace.jsonl                    # a prior for your model
    python scripts/fit_prior.py --out policy/priors --replace               # the shipped one, refitted

A prior already in the folder for the same GGUF is kept unless --replace says otherwise. A daemon takes a
prior for a model at its next start or reload, and only while it has not learned that model yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from locod.daemon.config import RoutingConfig, load_config
from locod.errors import LocodError, PolicyError
from locod.policy import confidence
from locod.policy.messplus import DIM, TurnFeatures, _prior_weights, vectorize
from locod.policy.rule import LOCAL_PRIOR
from locod.policy.tasks import task_of
from locod.policy.trace import local_model, read_rows
from locod.policy.warmstart import PRIORS, USER_PRIORS, Prior, fit_logistic, read_prior, save_prior

REPO = Path(__file__).resolve().parent.parent
LOCAL = "local"  # the trace's one local model, whatever its name there (read_trace)
JUDGED_TOKENS = RoutingConfig().escalate_tokens  # what the daemon judges an answer over, by default
# The shipped trace's tasks in two groups, for measuring on tasks a prior has not seen (task_groups).
TASK_SPLIT = ({"add_1digit", "mul_2digit", "plural", "negation"}, {"add_2digit", "wikidata", "past_tense"})


def read_trace(path: Path) -> list[dict]:  # type: ignore[type-arg]
    """A trace's rows with its one local model's fields under LOCAL: a trace holds whichever GGUF answered
    it, under that model's name."""
    try:
        rows = read_rows(path)
        name = local_model(rows, path)
    except PolicyError as exc:
        raise SystemExit(str(exc)) from None
    for row in rows:
        row["models"][LOCAL] = row["models"].pop(name)
    return rows


def task_groups(rows: list[dict]) -> tuple[set[str], set[str]]:  # type: ignore[type-arg]
    """A trace's tasks in two groups (replay.py --split task, confidence.py's reference): the shipped
    trace's TASK_SPLIT, or any other trace's tasks taken alternately in the order of their names."""
    tasks = sorted({r["task"] for r in rows})
    if set(tasks) == TASK_SPLIT[0] | TASK_SPLIT[1]:
        return TASK_SPLIT
    return set(tasks[0::2]), set(tasks[1::2])


def answer_features(row: dict) -> tuple[float, ...] | None:  # type: ignore[type-arg]
    """The confidence features of the local model's answer as the daemon's checkpoint reads them (its first
    routing.escalate_tokens tokens at the default, the length scaled to that many; an answer cut at the
    trace's own limit is judged on the tokens it has), or None for a trace without log-probs."""
    local = row["models"][LOCAL]
    if "logprobs" not in local:
        return None
    return confidence.judged(row["prompt"], local["tokens"], local["logprobs"], JUDGED_TOKENS)


def prompt_matrix(rows: list[dict]) -> np.ndarray:  # type: ignore[type-arg]
    x = np.zeros((len(rows), DIM))
    for i, row in enumerate(rows):
        indices, values = vectorize(
            TurnFeatures(prompt=row["prompt"], task=task_of(row["prompt"]), position=row["turn"])
        )
        x[i, indices] = values
    return x


def fit(rows: list[dict], sha256: str, gguf_size: int, source: str) -> Prior:  # type: ignore[type-arg]
    x = prompt_matrix(rows)
    y = np.array([row["models"][LOCAL]["satisfied"] for row in rows], dtype=np.float64)
    start = _prior_weights(LOCAL_PRIOR)
    weights = fit_logistic(x, y, start)
    conf = [answer_features(row) for row in rows]
    head = confidence.identity()
    if all(c is not None for c in conf):
        out_of_fold = np.zeros(len(rows))
        folds = np.arange(len(rows)) % 2
        for k in (0, 1):
            w = fit_logistic(x[folds != k], y[folds != k], start)
            out_of_fold[folds == k] = 1.0 / (1.0 + np.exp(-(x[folds == k] @ w)))
        h = confidence.ConfidenceHead()
        tasks = [task_of(row["prompt"]) for row in rows]
        z = np.array([h.inputs(s, c, t) for s, c, t in zip(out_of_fold, conf, tasks)])  # type: ignore[arg-type]
        head = fit_logistic(z, y, confidence.identity())
    return Prior(sha256, gguf_size, weights, head, source)


def gguf_of(trace: Path, rows: list[dict]) -> tuple[str, str, int]:  # type: ignore[type-arg]
    """The SHA-256, name and size of the GGUF that answered the trace: a prior is keyed by them (the size
    is in the trace's .meta.json, which build_trace.py writes beside it)."""
    meta = trace.with_suffix(".meta.json")
    sha = rows[0]["models"][LOCAL].get("gguf_sha256")
    if not sha or not meta.is_file():
        raise SystemExit(
            f"{trace}: a prior is keyed by the GGUF that answered the trace, and this one does not say which "
            f"({'no gguf_sha256 in its turns' if not sha else f'no {meta.name} beside it'}); build_trace.py writes both"
        )
    ((name, size),) = json.loads(meta.read_text())["local_gguf_size"].items()
    return sha, name, int(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trace", default=str(REPO / "policy/data/bigbench_trace.jsonl"), help="default: the development trace"
    )
    parser.add_argument(
        "--out",
        help=f"folder for the prior (default: the state directory's {USER_PRIORS}/, which the daemon reads before "
        "the shipped priors; the shipped ones are made with --out policy/priors)",
    )
    parser.add_argument("--replace", action="store_true", help="replace a prior already there for this GGUF")
    args = parser.parse_args()
    trace, out = Path(args.trace), Path(args.out) if args.out else user_priors()
    rows = read_trace(trace)
    sha, name, size = gguf_of(trace, rows)
    there = out / f"{sha}.npz"
    if there.exists() and not args.replace:
        raise SystemExit(
            f"{there} already holds a prior for this GGUF ({read_prior(there).source}): --replace replaces it, "
            "--out DIR writes elsewhere"
        )
    digest = hashlib.sha256(trace.read_bytes()).hexdigest()
    prior = fit(rows, sha, size, f"{trace.name} (sha256 {digest[:12]}, {len(rows)} turns)")
    print(f"{save_prior(prior, out)}: {who_reads(out, name, sha)}")


def user_priors() -> Path:
    """The state directory's folder of the user's own priors, as the configuration (and environment) say."""
    try:
        return load_config().state_dir / USER_PRIORS
    except LocodError as exc:
        raise SystemExit(f"{exc}; --out DIR names the folder instead") from None


def who_reads(out: Path, name: str, sha: str) -> str:
    """Which daemon starts the model from a prior written to ``out``, and when."""
    if out.resolve() == PRIORS.resolve():
        return f"shipped with the package, for a daemon with no prior of its own for {name}"
    if out.name != USER_PRIORS:
        return f"no daemon reads it here: a daemon reads <its state directory>/{USER_PRIORS}, then {PRIORS}"
    instead = " instead of the shipped prior" if (PRIORS / f"{sha}.npz").exists() else ""
    return (
        f"a daemon whose state directory is {out.parent} starts {name} from it{instead} at its next start or "
        f"`locod reload`, unless it has learned {name} already (labels in {out.parent / 'messplus.npz'})"
    )


if __name__ == "__main__":
    main()
