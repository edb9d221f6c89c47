#!/usr/bin/env python3
"""Replay routers over a trace (docs/routing.md) in streaming order, labels revealed only after each
decision and only for the model that answered, and report satisfaction, SLA violation, cloud share and
cost for each SLA target, with plots.

Routers: always-local, always-cloud, random at MESS+'s cloud share, a RouteLLM-style threshold on the
same online predictor calibrated to MESS+'s cloud share, and MESS+ (locod.policy.messplus, the code the
daemon runs, with the daemon's priors and cost weights).

    pip install '.[eval]'
    python scripts/replay.py [--trace policy/data/bigbench_trace.jsonl] [--out docs/img] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from locod.policy.messplus import MessPlus, TurnFeatures, vectorize
from locod.policy.rule import CLOUD_PRIOR, ENERGY_REF_J, LOCAL_PRIOR, MONEY_REF_USD
from locod.policy.tasks import task_of

REPO = Path(__file__).resolve().parent.parent
LOCAL, CLOUD = "smollm2-135m-instruct", "cloud"
ALPHAS = (0.5, 0.6, 0.7, 0.8)
WEIGHT_MONEY, WEIGHT_ENERGY = 1.0, 0.2  # routing.weight_money / weight_energy defaults


@dataclass
class Run:
    name: str
    satisfied: list[int] = field(default_factory=list)
    clouds: list[int] = field(default_factory=list)
    usd: float = 0.0
    energy_j: float = 0.0
    q: list[float] = field(default_factory=list)

    def summary(self, alpha: float, cloud_usd: float) -> dict[str, float]:
        n = len(self.satisfied)
        sat = sum(self.satisfied) / n
        return {
            "satisfaction": sat,
            "violation": max(0.0, alpha - sat),
            "cloud_share": sum(self.clouds) / n,
            "cost_vs_cloud": self.usd / cloud_usd if cloud_usd else 0.0,
            "energy_j": self.energy_j,
        }


def costs(row: dict) -> dict[str, float]:  # type: ignore[type-arg]
    raw = {
        m: WEIGHT_MONEY * v["usd"] / MONEY_REF_USD + WEIGHT_ENERGY * v["energy_j"] / ENERGY_REF_J
        for m, v in ((LOCAL, row["models"][LOCAL]), (CLOUD, row["models"]["cloud"]))
    }
    top = max(raw.values()) or 1.0
    return {m: c / top for m, c in raw.items()}


def features(row: dict, prev_cloud: bool) -> TurnFeatures:  # type: ignore[type-arg]
    return TurnFeatures(prompt=row["prompt"], task=task_of(row["prompt"]), position=row["turn"], prev_cloud=prev_cloud)


def replay(trace: list[dict], name: str, pick: Callable[..., tuple[str, MessPlus | None]]) -> Run:  # type: ignore[type-arg]
    """``pick(row, x, t)`` returns the model and the MessPlus whose predictor learns from the label."""
    run = Run(name)
    prev_cloud = False
    for t, row in enumerate(trace):
        x = vectorize(features(row, prev_cloud if row["turn"] else False))
        model, learner = pick(row, x, t)
        outcome = row["models"][LOCAL if model == LOCAL else "cloud"]
        run.satisfied.append(outcome["satisfied"])
        run.clouds.append(int(model != LOCAL))
        run.usd += outcome["usd"]
        run.energy_j += outcome["energy_j"]
        if learner is not None:
            learner.label(t, model, x, bool(outcome["satisfied"]))
            run.q.append(learner.state.q)
        prev_cloud = model != LOCAL
    return run


def new_messplus(alpha: float, v: float, c: float, seed: int) -> MessPlus:
    return MessPlus(
        {LOCAL: LOCAL_PRIOR, CLOUD: CLOUD_PRIOR}, sla=alpha, v=v, explore_c=c, q_cap=50.0, rng=random.Random(seed)
    )


def messplus_router(alpha: float, v: float, c: float, seed: int) -> Callable[..., tuple[str, MessPlus]]:
    m = new_messplus(alpha, v, c, seed)

    def pick(row: dict, x: object, t: int) -> tuple[str, MessPlus]:  # type: ignore[type-arg]
        options = costs(row)
        choice = m.choose(options, xs={k: x for k in options})  # type: ignore[misc]
        m.settle(t, choice.model, choice.s_hat[choice.key])
        return choice.model, m

    return pick


def threshold_router(threshold: float, seed: int) -> Callable[..., tuple[str, MessPlus]]:
    """RouteLLM's rule on MESS+'s predictor: cloud when the local model's predicted satisfaction is low."""
    m = new_messplus(0.0, 0.0, 0.2, seed)  # same predictor and the same exploration to collect labels

    def pick(row: dict, x: object, t: int) -> tuple[str, MessPlus]:  # type: ignore[type-arg]
        explore = m.rng.random() < m.explore_probability
        m.state.t += 1
        if explore:
            return m.rng.choice([LOCAL, CLOUD]), m
        return (CLOUD if m.satisfaction(x, LOCAL) < threshold else LOCAL), m  # type: ignore[arg-type]

    return pick


def calibrated_threshold(trace: list[dict], share: float, seed: int) -> tuple[float, Run]:  # type: ignore[type-arg]
    lo, hi = 0.0, 1.0
    best = replay(trace, "threshold", threshold_router(0.5, seed))
    for _ in range(14):
        mid = (lo + hi) / 2
        run = replay(trace, "threshold", threshold_router(mid, seed))
        best = run
        got = sum(run.clouds) / len(run.clouds)
        if abs(got - share) < 0.005:
            break
        lo, hi = (mid, hi) if got < share else (lo, mid)
    return mid, best


def oracle_cloud_share(trace: list[dict], alpha: float) -> float:  # type: ignore[type-arg]
    """The least cloud share that reaches ``alpha`` knowing every label in advance: local wherever the
    local model satisfies, cloud only where it does not and the cloud does, and only as often as needed."""
    n = len(trace)
    free = sum(r["models"][LOCAL]["satisfied"] for r in trace)
    rescuable = sum(1 for r in trace if not r["models"][LOCAL]["satisfied"] and r["models"]["cloud"]["satisfied"])
    needed = max(0.0, alpha * n - free)
    return needed / n if needed <= rescuable else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(REPO / "policy/data/bigbench_trace.jsonl"))
    parser.add_argument("--out", default=str(REPO / "docs/img"))
    parser.add_argument("--v", type=float, default=1.0)
    parser.add_argument("--explore-c", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    trace = [json.loads(line) for line in Path(args.trace).read_text().splitlines()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(trace)
    local_acc = sum(r["models"][LOCAL]["satisfied"] for r in trace) / n
    cloud_acc = sum(r["models"]["cloud"]["satisfied"] for r in trace) / n
    print(f"trace: {n} turns; always-local satisfaction {local_acc:.3f}, always-cloud {cloud_acc:.3f}\n")
    print("| alpha | router | satisfaction | SLA violation | cloud share | cost vs always-cloud | energy (kJ) |")
    print("|---|---|---|---|---|---|---|")
    fig, axes = plt.subplots(2, len(ALPHAS), figsize=(4 * len(ALPHAS), 6.5), sharex=True)
    for col, alpha in enumerate(ALPHAS):
        rng = random.Random(args.seed)
        always_local = replay(trace, "always-local", lambda row, x, t: (LOCAL, None))
        always_cloud = replay(trace, "always-cloud", lambda row, x, t: (CLOUD, None))
        mess = replay(trace, "MESS+", messplus_router(alpha, args.v, args.explore_c, args.seed))
        share = sum(mess.clouds) / n
        randomly = replay(
            trace,
            "random (same share)",
            lambda row, x, t, rng=rng, share=share: (CLOUD if rng.random() < share else LOCAL, None),
        )
        threshold, routellm = calibrated_threshold(trace, share, args.seed)
        routellm.name = f"threshold {threshold:.2f} (same share)"
        oracle_share = oracle_cloud_share(trace, alpha)
        print(
            f"| {alpha} | oracle lower bound (knows every label) | {alpha:.3f} | 0.000 | {oracle_share:.3f} | "
            f"~{oracle_share:.3f} | - |"
        )
        for run in (always_local, always_cloud, randomly, routellm, mess):
            s = run.summary(alpha, always_cloud.usd)
            print(
                f"| {alpha} | {run.name} | {s['satisfaction']:.3f} | {s['violation']:.3f} | "
                f"{s['cloud_share']:.3f} | {s['cost_vs_cloud']:.3f} | {s['energy_j'] / 1e3:.1f} |"
            )
        top, bottom = axes[0][col], axes[1][col]
        for run in (always_local, always_cloud, randomly, routellm, mess):
            running = [sum(run.satisfied[: i + 1]) / (i + 1) for i in range(n)]
            top.plot(running, label=run.name, linewidth=1.6 if run is mess else 0.9)
        top.axhline(alpha, color="black", linestyle="--", linewidth=0.8)
        top.set_title(f"alpha = {alpha}")
        top.set_ylim(0, 1)
        bottom.plot(mess.q, color="tab:purple")
        bottom.set_xlabel("turn")
        if col == 0:
            top.set_ylabel("time-average satisfaction")
            bottom.set_ylabel("MESS+ queue Q")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "replay_messplus.png", dpi=110)
    print(f"\nplot: {out / 'replay_messplus.png'}")


if __name__ == "__main__":
    main()
