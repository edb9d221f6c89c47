#!/usr/bin/env python3
"""Which statistic of the local answer's token log-probs predicts its label, and from which point in the
answer (docs/routing.md). Needs a trace with log-probs (scripts/build_trace.py).

For each statistic of policy/confidence.py, over the first k tokens of the answer (k = 4, 8, 16, all) and
over its content tokens: the AUC against the local label over the whole trace and within each task (the
mean of the per-task AUCs, weighted by turns: whether it ranks answers of the same task, which the task
alone cannot), and the AUC of the prompt-only predictor and of the ConfidenceHead over both (both fitted
on one half, measured on the other).

    python scripts/confidence.py [--trace policy/data/bigbench_trace.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from fit_prior import LOCAL, answer_features, fit, prompt_matrix

from locod.policy import confidence
from locod.policy.tasks import task_of

REPO = Path(__file__).resolve().parent.parent
BUDGETS = (4, 8, 16, None)


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Probability that a random right answer scores above a random wrong one (ties count half)."""
    pos, neg = score[y == 1], score[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def within_task(score: np.ndarray, y: np.ndarray, tasks: np.ndarray) -> float:
    aucs = [(auc(score[tasks == t], y[tasks == t]), (tasks == t).sum()) for t in np.unique(tasks)]
    aucs = [(a, n) for a, n in aucs if a == a]
    return sum(a * n for a, n in aucs) / sum(n for _, n in aucs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(REPO / "policy/data/bigbench_trace.jsonl"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.trace).read_text().splitlines()]
    y = np.array([r["models"][LOCAL]["satisfied"] for r in rows])
    tasks = np.array([r["task"] for r in rows])
    print("| statistic | tokens | AUC, whole trace | AUC within tasks |\n|---|---|---|---|")
    for budget in BUDGETS:
        feats = np.array(
            [
                confidence.features(
                    confidence.Answer(r["prompt"], r["models"][LOCAL]["tokens"], r["models"][LOCAL]["logprobs"]),
                    int(r["models"][LOCAL]["max_tokens"]),
                    budget,
                )
                for r in rows
            ]
        )
        for i, name in enumerate(confidence.FEATURES):
            sign = -1.0 if name in ("unsure_share", "length") else 1.0  # more doubt, longer: less likely right
            score = sign * feats[:, i]
            print(f"| {name} | {budget or 'all'} | {auc(score, y):.3f} | {within_task(score, y, tasks):.3f} |")
    half = len(rows) // 2
    prior = fit(rows[:half], "", 0, "first half")
    test = rows[half:]
    x = prompt_matrix(test)
    s_prompt = 1.0 / (1.0 + np.exp(-(x @ prior.weights)))
    head = confidence.ConfidenceHead(prior.confidence)
    s_answer = np.array(
        [head.predict(s, answer_features(r), task_of(r["prompt"])) for s, r in zip(s_prompt, test)]  # type: ignore[arg-type]
    )
    yt, tt = y[half:], tasks[half:]
    print("\n| predictor (fitted on the first half, measured on the second) | AUC | AUC within tasks |\n|---|---|---|")
    print(
        f"| prompt only (MESS+ head: n-grams + task) | {auc(s_prompt, yt):.3f} | {within_task(s_prompt, yt, tt):.3f} |"
    )
    both = f"{auc(s_answer, yt):.3f} | {within_task(s_answer, yt, tt):.3f}"
    print(f"| prompt + answer confidence (ConfidenceHead) | {both} |")


if __name__ == "__main__":
    main()
