#!/usr/bin/env python3
"""Which statistic of the local answer's token log-probs predicts its label, and from which point in the
answer (docs/routing.md). Needs a trace with log-probs (scripts/build_trace.py).

For each statistic of policy/confidence.py, over the first k tokens of the answer (k = 4, 8, 16, all) and
over its content tokens: the AUC against the local label over the whole trace and within each task (the
mean of the per-task AUCs, weighted by turns: whether it ranks answers of the same task, which the task
alone cannot), and the AUC of the prompt-only predictor and of the ConfidenceHead over both (both fitted
on one half, measured on the other); then what those signals let a rule capture offline.

    python scripts/confidence.py [--trace policy/data/bigbench_trace.jsonl]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from fit_prior import LOCAL, answer_features, fit, prompt_matrix, read_trace, task_groups

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
    if not aucs:  # every task all right or all wrong
        return float("nan")
    return sum(a * n for a, n in aucs) / sum(n for _, n in aucs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trace", default=str(REPO / "policy/data/bigbench_trace.jsonl"), help="default: the development trace"
    )
    args = parser.parse_args()
    rows = read_trace(Path(args.trace))
    y = np.array([r["models"][LOCAL]["satisfied"] for r in rows])
    if y.min() == y.max():
        raise SystemExit(
            f"{args.trace}: the local model is always {'right' if y[0] else 'wrong'} on it: no statistic of its "
            "answers has right and wrong ones to tell apart; add questions it gets the other way"
        )
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
    s_prompt, s_answer = predict(rows[:half], rows[half:])
    yt, tt = y[half:], tasks[half:]
    print("\n| predictor (fitted on the first half, measured on the second) | AUC | AUC within tasks |\n|---|---|---|")
    print(
        f"| prompt only (MESS+ head: n-grams + task) | {auc(s_prompt, yt):.3f} | {within_task(s_prompt, yt, tt):.3f} |"
    )
    both = f"{auc(s_answer, yt):.3f} | {within_task(s_answer, yt, tt):.3f}"
    print(f"| prompt + answer confidence (ConfidenceHead) | {both} |")
    print_reference(rows)


def predict(fit_on: list[dict], rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    """The local model's s_hat on ``rows`` from heads fitted on ``fit_on``: from the prompt alone, and
    corrected by the answer's confidence."""
    prior = fit(fit_on, "", 0, "")
    s_prompt = 1.0 / (1.0 + np.exp(-(prompt_matrix(rows) @ prior.weights)))
    head = confidence.ConfidenceHead(prior.confidence)
    conf = [answer_features(r) for r in rows]
    s_answer = [head.predict(s, c, task_of(r["prompt"])) for s, c, r in zip(s_prompt, conf, rows)]  # type: ignore[arg-type]
    return s_prompt, np.array(s_answer)


def print_reference(rows: list[dict]) -> None:  # type: ignore[type-arg]
    """What these signals let a rule capture, offline: turns sent to the cloud in the order of the s_hat
    above (fitted on the other half of the part, in 2 interleaved folds), as many as reach alpha knowing
    every label. A reference, not a bound: a router learning online from every label may do a little better
    or worse, but not much better without a better signal."""
    groups = {", ".join(sorted(ts)): [r for r in rows if r["task"] in ts] for ts in task_groups(rows) if ts}
    parts = {"whole trace": rows, **groups}
    print("\n| part | AUC of s_hat | offline capture at alpha 0.5 | 0.6 | 0.7 |\n|---|---|---|---|---|")
    for name, part in parts.items():
        folds = np.arange(len(part)) % 2
        score = np.zeros(len(part))
        for k in (0, 1):
            fit_on = [r for r, f in zip(part, folds) if f != k]
            score[folds == k] = predict(fit_on, [r for r, f in zip(part, folds) if f == k])[1]
        y_local, y_cloud = (np.array([r["models"][m]["satisfied"] for r in part]) for m in (LOCAL, "cloud"))
        captures = [capture(score, y_local, y_cloud, alpha) for alpha in (0.5, 0.6, 0.7)]
        shown = ["-" if np.isnan(c) else f"{c:.2f}" for c in captures]
        print(f"| {name} | {auc(score, y_local):.3f} | {' | '.join(shown)} |")
    print(
        "\n(-: the local model alone reaches that alpha, no mix of the two models' answers does, or knowing every "
        "label saves less than a turn over random routing)"
    )


def capture(score: np.ndarray, y_local: np.ndarray, y_cloud: np.ndarray, alpha: float) -> float:
    """(random needs - share) / (random needs - label oracle's share), the share being the fewest turns that
    reach alpha sent to the cloud least-likely-right first."""
    n, local, cloud = len(score), y_local.mean(), y_cloud.mean()
    reached = y_local.sum() + np.cumsum((y_cloud - y_local)[np.argsort(score, kind="stable")])
    if local >= alpha or not (reached >= alpha * n).any():
        return float("nan")  # reached by the local model alone, or by no mix
    share = (int(np.argmax(reached >= alpha * n)) + 1) / n
    random_needs, oracle = (alpha - local) / (cloud - local), max(0.0, alpha - local)
    if random_needs - oracle < 1 / n:  # less than a turn between them: the ratio would be rounding blown up
        return float("nan")
    return (random_needs - share) / (random_needs - oracle)


if __name__ == "__main__":
    main()
