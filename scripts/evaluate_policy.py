#!/usr/bin/env python3
"""Evaluate the shipped TMO policy against heuristics and MESS+ on held-out episodes (docs/evaluation.md).

Settings: simulator episodes starting on WiFi, on cellular (both with the usual network changes), with
tight and with loose budgets, and dialogues of the replay trace, all with an idle local queue; then WiFi
and the trace with the local queue under load in every episode (tmo_env.LocalQueue). Strategies: local
only, cloud text only, cloud with every attachment, random, MESS+ only (relevant attachments), the TMO
policy alone (its most likely allowed action), and MESS+ combined with the policy (the daemon's rule);
then three yardsticks: the policy without the budget shield (what RC-RL alone keeps to), and, on
simulator settings, an oracle that knows each action's mean quality and a plan that also knows every
turn ahead. Same episodes, budgets and seeds for every strategy; the training seed differs from the
evaluation seeds. Last, MESS+ alone and combined over several seeds, at the tables' alpha = 0.7 (which
no rule reaches in these settings) and at lower SLA targets.

    pip install '.[eval]'
    python scripts/evaluate_policy.py [--episodes 600] [--policy ONNX] [--trace TRACE] [--out DIR]

About 8 minutes with the defaults on 2 cores. The plot goes to docs/img only for the shipped policy and
trace (the figure docs/evaluation.md shows), else to the current folder (--out DIR elsewhere).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from locod.errors import PolicyError
from locod.policy.evaluate import ClairvoyantPlan, ExpectedRewardOracle, Router, Scores, heuristics, run
from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy
from locod.policy.tmo_env import Simulator, TraceSource, TurnSource

REPO = Path(__file__).resolve().parent.parent
DEV_TRACE = REPO / "policy/data/bigbench_trace.jsonl"
SLA = 0.7
SLA_TARGETS = (0.3, 0.5, 0.7)
# episode sources, budget span, share of episodes whose local queue is under load
Setting = tuple[list[tuple[TurnSource, float]], tuple[float, float] | None, float]
ORACLE = "oracle: knows mean quality"
PLAN = "clairvoyant plan: knows the episode ahead"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=600, help="held-out episodes per setting (default: 600)")
    parser.add_argument("--policy", default=str(DEFAULT_POLICY), help="ONNX policy (default: the shipped one)")
    parser.add_argument(
        "--trace",
        default=str(DEV_TRACE),
        help="replay trace of the trace settings: any trace build_trace.py makes (default: the shipped one)",
    )
    parser.add_argument(
        "--out",
        help="folder for evaluation_policy.png: docs/img for the shipped policy and trace, else the current one",
    )
    parser.add_argument("--sla-seeds", type=int, default=8, help="seeds for the SLA target comparison (default: 8)")
    args = parser.parse_args()
    if args.out is None:
        shipped = Path(args.policy).resolve() == DEFAULT_POLICY.resolve() and Path(args.trace).resolve() == DEV_TRACE
        args.out = str(REPO / "docs/img" if shipped else Path.cwd())
    policy = OnnxPolicy(Path(args.policy))
    try:
        settings = settings_of(Path(args.trace))
    except PolicyError as exc:
        raise SystemExit(f"--trace: {exc}") from None
    results = {name: evaluate(setting, policy, args.episodes) for name, setting in settings.items()}
    print(
        f"policy {policy.version}; {args.episodes} held-out episodes per setting; SLA measure: quality >= 0.5, "
        f"alpha = {SLA} for the MESS+ rows\n"
    )
    for name, rows in results.items():
        print_table(name, rows)
    sla_targets(settings, policy, args.episodes, args.sla_seeds)
    plot(results, args.episodes, Path(args.out))


def settings_of(trace: Path) -> dict[str, Setting]:
    return {
        "WiFi, sampled budgets": ([(Simulator(links=("wifi",)), 1.0)], None, 0.0),
        "cellular, sampled budgets": ([(Simulator(links=("cellular",)), 1.0)], None, 0.0),
        "mixed networks, tight budgets": ([(Simulator(), 1.0)], (0.0, 0.1), 0.0),
        "mixed networks, loose budgets": ([(Simulator(), 1.0)], (0.5, 1.0), 0.0),
        "replay trace (text only)": ([(TraceSource(trace), 1.0)], None, 0.0),
        "WiFi, local queue under load": ([(Simulator(links=("wifi",)), 1.0)], None, 1.0),
        "replay trace, local queue under load": ([(TraceSource(trace), 1.0)], None, 1.0),
    }


def evaluate(setting: Setting, policy: OnnxPolicy, episodes: int) -> dict[str, Scores]:
    """Every strategy and yardstick on the setting's episodes (the same episodes and seed for each)."""
    sources, budgets, load = setting

    def policy_only(obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        return int(np.argmax(np.where(mask > 0, policy.log_probs(obs, mask), -np.inf)))

    strategies = {
        **heuristics(),
        "MESS+ only": Router(SLA, seed=1),
        "TMO policy only": policy_only,
        "MESS+ with TMO policy": Router(SLA, log_pi=policy.log_probs, seed=1),
    }
    same = dict(episodes=episodes, seed=2024, budget_span=budgets, load_p=load)
    rows = {name: run(strategy, sources, **same) for name, strategy in strategies.items()}
    rows["TMO policy, no shield"] = run(policy_only, sources, shield=False, **same)
    if all(isinstance(source, Simulator) for source, _ in sources):  # it needs the simulator's mean quality
        for name, yardstick in ((ORACLE, ExpectedRewardOracle()), (PLAN, ClairvoyantPlan())):
            rows[name] = run(yardstick, sources, **same)
    return rows


def print_table(setting: str, rows: dict[str, Scores]) -> None:
    print(f"### {setting}\n")
    print(
        "| strategy | reward | quality | SLA attainment | latency (s) | money ($/turn) | energy (J/turn) "
        "| episodes over budget | cloud share | attachments sent |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        print(
            f"| {name} | {s.reward:.3f} | {s.quality:.3f} | {s.satisfaction:.3f} | {s.latency_s:.2f} | "
            f"{s.usd:.5f} | {s.energy_j:.1f} | {s.violations} | {s.cloud_share:.2f} | {s.uploads:.2f} |"
        )
    best = max((s.reward for n, s in rows.items() if n in heuristics()), default=0.0)
    print()
    for name in ("MESS+ with TMO policy", "TMO policy only", ORACLE, PLAN):
        if name in rows and best > 0:
            print(f"{name} / best heuristic reward: {rows[name].reward / best:.3f}  ")
    print()


def plot(results: dict[str, dict[str, Scores]], episodes: int, out: Path) -> None:
    """Reward and budget violations by strategy, one bar per setting: docs/img/evaluation_policy.png."""
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(next(iter(results.values())))  # the first setting has every row
    width = 0.8 / len(results)
    for i, (setting, rows) in enumerate(results.items()):
        xs = np.arange(len(names)) + i * width
        axes[0].bar(xs, [rows[n].reward if n in rows else np.nan for n in names], width, label=setting)
        axes[1].bar(xs, [rows[n].violations / episodes if n in rows else np.nan for n in names], width, label=setting)
    for ax, title in zip(axes, ("mean reward per turn", "share of episodes over a budget"), strict=True):
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "evaluation_policy.png", dpi=110)
    print(f"plot: {out / 'evaluation_policy.png'}")


def sla_targets(settings: dict[str, Setting], policy: OnnxPolicy, episodes: int, seeds: int) -> None:
    """MESS+ alone and combined over several seeds (their SLA attainments differ by less than one seed's
    noise on some settings) and at SLA targets below the tables' alpha: what ``routing.sla`` trades."""
    print(f"### MESS+ alone and combined by SLA target, means over {seeds} seeds, {episodes} episodes each\n")
    print(
        "| setting | alpha | MESS+ only: reward (x best heuristic), SLA attainment "
        "| MESS+ with TMO policy: same | attainment, combined minus MESS+ (mean +- standard error) |"
    )
    print("|---|---|---|---|---|")
    for setting, (sources, budgets, load) in settings.items():
        rows: dict[float, list[tuple[float, float, float, float]]] = {alpha: [] for alpha in SLA_TARGETS}
        for seed in range(1, seeds + 1):
            same = dict(episodes=episodes, seed=2024 + seed, budget_span=budgets, load_p=load)
            best = max(run(h, sources, **same).reward for h in heuristics().values())
            for alpha in SLA_TARGETS:
                alone = run(Router(alpha, seed=seed), sources, **same)
                combined = run(Router(alpha, log_pi=policy.log_probs, seed=seed), sources, **same)
                rows[alpha].append(
                    (alone.reward / best, alone.satisfaction, combined.reward / best, combined.satisfaction)
                )
        for alpha in SLA_TARGETS:
            table = np.array(rows[alpha])
            mean, diff = table.mean(axis=0), table[:, 3] - table[:, 1]
            error = f"{diff.std(ddof=1) / np.sqrt(len(diff)):.4f}" if len(diff) > 1 else "- (one seed)"
            print(
                f"| {setting} | {alpha} | {mean[0]:.3f}, {mean[1]:.3f} | {mean[2]:.3f}, {mean[3]:.3f} | "
                f"{diff.mean():+.4f} +- {error} |"
            )
    print()


if __name__ == "__main__":
    main()
