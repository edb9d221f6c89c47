#!/usr/bin/env python3
"""Replay routers over a trace (docs/routing.md) in streaming order, each label revealed only after its
decision and only for the answers that were given, and report satisfaction, SLA violation, cloud share, how
much of the distance from random routing to the label oracle each router captures, cost and latency.

Beside the routers: "random needs", the cloud share at which random routing reaches alpha in expectation,
(alpha - local) / (cloud - local), the label oracle's share (it knows every label in advance), and the task
oracle's (it knows each task's accuracy, no single label: what knowing the task alone allows).
Routers, all on MESS+'s own predictor (locod.policy.messplus, the code the daemon runs):
- MESS+ as the paper has it (Q alone prices satisfaction), V = 1: the daemon's rule before issue #18;
- the price rule (feed-forward price + signed queue, V = --v), from a cold start;
- the same with shadow labels: on every cloud-routed turn the local model also answers and the cloud's
  answer grades it (simulated grader: it errs where the cloud's own answer is wrong, and at the stated
  --grader-error rate besides);
- the same from a warm-start prior: fitted on the other part of the trace (--split half or task: the
  trace's halves, or two groups of its tasks), or the one this project ships for the trace's local GGUF
  (--split shipped: how a fresh install starts; honest only on a trace it was not fitted on, such as
  policy/data/bigbench_unseen_trace.jsonl);
- answer locally, escalate if unsure: the local model answers, its s_hat is corrected by the answer's
  confidence (policy/confidence.py), and the price rule keeps the answer or sends the turn to the cloud; a
  turn goes to the cloud at once only when even a fully confident answer would be escalated. An escalated
  turn costs the local answer and the cloud call, and waits for both.

    pip install '.[eval]'
    python scripts/replay.py [--trace policy/data/bigbench_trace.jsonl] [--split none|shipped|half|task] [--seed 1 2 3]

The tables follow a line saying what they rest on besides the trace's labels (seeds, V, exploration, the
grader's error rate, how the cloud labels were made); with several seeds each router's row holds its means
and the range of its capture. The plot (the first seed's runs) goes to docs/img only for the run whose plot
docs/routing.md shows (the development trace, --split half, seed 1, the other options at their defaults), else
beside the trace.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from fit_prior import LOCAL, answer_features, fit, read_trace, task_groups

from locod.daemon.config import RoutingConfig
from locod.policy import rule
from locod.policy.messplus import MessPlus, TurnFeatures, vectorize
from locod.policy.rule import CLOUD_PRIOR, ENERGY_REF_J, LOCAL_PRIOR, MONEY_REF_USD
from locod.policy.tasks import task_of
from locod.policy.warmstart import PRIORS, Prior, read_prior

REPO = Path(__file__).resolve().parent.parent
CLOUD = "cloud"
MODELS = {LOCAL: LOCAL, CLOUD: CLOUD}  # each action is its model's
DEV_TRACE = REPO / "policy/data/bigbench_trace.jsonl"
ALPHAS = (0.5, 0.6, 0.7, 0.8)
DAEMON = RoutingConfig()  # the daemon's [routing] defaults: what the replay measures unless told otherwise
FIGURE_OPTIONS = ("split", "v", "explore_c", "alphas", "grader_error")  # with the trace and seed: what the plot shows


@dataclass
class Run:
    name: str
    satisfied: list[int] = field(default_factory=list)
    clouds: list[int] = field(default_factory=list)
    usd: float = 0.0
    energy_j: float = 0.0
    latency_s: float = 0.0
    escalated: int = 0
    shadows: int = 0
    shadow_errors: int = 0
    q: list[float] = field(default_factory=list)

    def add(self, row: dict, models: list[str], satisfied: int) -> None:  # type: ignore[type-arg]
        """A turn answered by ``models`` in turn (the last answer counts; all of them cost)."""
        self.satisfied.append(satisfied)
        self.clouds.append(int(CLOUD in models))
        for m in models:
            self.usd += row["models"][m]["usd"]
            self.energy_j += row["models"][m]["energy_j"]
            self.latency_s += row["models"][m]["latency_s"]
        self.escalated += len(models) > 1


@dataclass(frozen=True)
class Turn:
    row: dict  # type: ignore[type-arg]
    x: tuple[np.ndarray, np.ndarray]
    costs: dict[str, float]
    conf: tuple[float, ...] | None
    task: str
    local_x: tuple[np.ndarray, np.ndarray] | None = None  # the local head's own features (scripts/embed_probe.py)

    def x_of(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """The features ``model``'s head reads: MESS+'s, or the local model's own where a probe gives them."""
        return self.local_x if model == LOCAL and self.local_x is not None else self.x


def costs(row: dict) -> dict[str, float]:  # type: ignore[type-arg]
    raw = {
        m: DAEMON.weight_money * row["models"][m]["usd"] / MONEY_REF_USD
        + DAEMON.weight_energy * row["models"][m]["energy_j"] / ENERGY_REF_J
        for m in (LOCAL, CLOUD)
    }
    top = max(raw.values()) or 1.0
    return {m: c / top for m, c in raw.items()}


def turns(trace: list[dict]) -> list[Turn]:  # type: ignore[type-arg]
    """The trace as the routers see it (prev_cloud left out: it depends on the router, and no decision here
    would differ by it before the predictor has learned its weight)."""
    return [
        Turn(
            row,
            vectorize(TurnFeatures(prompt=row["prompt"], task=task_of(row["prompt"]), position=row["turn"])),
            costs(row),
            answer_features(row),
            task_of(row["prompt"]),
        )
        for row in trace
    ]


def new_messplus(alpha: float, v: float, c: float, seed: int, prior: Prior | None = None) -> MessPlus:
    priors = {LOCAL: LOCAL_PRIOR, CLOUD: CLOUD_PRIOR}
    m = MessPlus(priors, sla=alpha, v=v, explore_c=c, q_cap=DAEMON.q_cap, rng=random.Random(seed))
    m.warm_start(LOCAL, prior)
    return m


@dataclass
class Grader:
    """Grades a shadow answer (the local model's, on a turn the cloud answered) against the cloud's: it
    errs where the cloud's own answer is wrong (a right local answer then looks wrong), and besides, at
    the stated ``error`` rate, either way (a normalised match or a judge is not perfect)."""

    error: float
    rng: random.Random

    def __call__(self, row: dict) -> int:  # type: ignore[type-arg]
        label = int(row["models"][LOCAL]["satisfied"] and row["models"][CLOUD]["satisfied"])
        return 1 - label if self.rng.random() < self.error else label


def learn_local(m: MessPlus, run: Run, t: Turn, s_prompt: float, label: int, shadow: bool) -> None:
    """A label for the local model's answer: its confidence head learns from it where log-probs exist, and a
    shadow label (the turn was answered in the cloud, whose head MessPlus.label trained) trains its prompt
    head too."""
    if shadow:
        m.train(LOCAL, t.x_of(LOCAL), float(label))
        run.shadows += 1
        run.shadow_errors += label != t.row["models"][LOCAL]["satisfied"]
    if t.conf is not None:
        m.confidence_head(LOCAL).train(s_prompt, t.conf, t.task, bool(label))


def paper_rule(trace: list[Turn], alpha: float, v: float, c: float, seed: int) -> Run:
    """MESS+ as the paper has it: argmin V * cost + Q * (alpha - s_hat), Q clipped at 0."""
    m, run, q = new_messplus(alpha, v, c, seed), Run(f"MESS+ paper rule, V = {v:g} (before)"), 0.0
    for t in trace:
        s = {k: m.satisfaction(t.x, k) for k in (LOCAL, CLOUD)}
        model = min(s, key=lambda k: v * t.costs[k] + q * (alpha - s[k]))
        if m.rng.random() < m.explore_probability:
            model = m.rng.choice([LOCAL, CLOUD])
        m.state.t += 1
        label = t.row["models"][model]["satisfied"]
        m.train(model, t.x, float(label))
        q = min(DAEMON.q_cap, max(0.0, q + alpha - label))
        run.add(t.row, [model], label)
        run.q.append(q)
    return run


def price_rule(trace: list[Turn], m: MessPlus, name: str, grade: Grader | None) -> Run:
    """The daemon's rule: choose, settle by the prediction, correct by the label; shadows grade the local
    model on cloud-routed turns."""
    run = Run(name)
    for i, t in enumerate(trace):
        choice = m.choose(t.costs, xs={LOCAL: t.x_of(LOCAL), CLOUD: t.x})
        m.settle(i, choice.model, choice.s_hat[choice.key])
        label = t.row["models"][choice.model]["satisfied"]
        m.label(i, choice.model, t.x_of(choice.model), bool(label))
        if choice.model == LOCAL:
            learn_local(m, run, t, choice.s_hat[LOCAL], label, False)
        elif grade is not None:
            learn_local(m, run, t, choice.s_hat[LOCAL], grade(t.row), True)
        run.add(t.row, [choice.model], label)
        run.q.append(m.state.z)
    return run


def escalating(trace: list[Turn], m: MessPlus, name: str, grade: Grader) -> Run:
    """Answer locally, escalate if unsure (with shadows on the turns sent to the cloud at once)."""
    run = Run(name)
    for i, t in enumerate(trace):
        s_prompt, s_cloud = m.satisfaction(t.x_of(LOCAL), LOCAL), m.satisfaction(t.x, CLOUD)
        head = m.confidence_head(LOCAL)
        hopeless = rule.escalates(t.costs[CLOUD], m.current_price, s_cloud, head.best(s_prompt, t.task))
        if t.conf is None or hopeless:
            choice = m.choose(t.costs, s_hat={LOCAL: s_prompt, CLOUD: s_cloud})
            tried = [choice.model]
        else:  # the local answer is paid for: keep it, or pay for the cloud as well
            s_answered = head.predict(s_prompt, t.conf, t.task)
            choice = rule.keep_or_escalate(m, (LOCAL, CLOUD), t.costs[CLOUD], s_answered, s_cloud, MODELS)
            tried = [LOCAL] if choice.model == LOCAL else [LOCAL, CLOUD]
        m.settle(i, choice.model, choice.s_hat[choice.key])
        label = t.row["models"][choice.model]["satisfied"]
        m.label(i, choice.model, t.x_of(choice.model), bool(label))
        if choice.model == LOCAL:
            learn_local(m, run, t, s_prompt, label, False)
        elif t.conf is not None:  # escalated, or a shadow answer of a turn sent to the cloud at once
            learn_local(m, run, t, s_prompt, grade(t.row), True)
        run.add(t.row, tried, label)
        run.q.append(m.state.z)
    return run


def random_needs(alpha: float, local: float, cloud: float) -> float:
    """The cloud share at which routing at random reaches ``alpha`` in expectation: none where the local
    model alone does, NaN where not even always-cloud does."""
    if alpha <= local:
        return 0.0
    return (alpha - local) / (cloud - local) if cloud >= alpha else float("nan")


def capture(needs: float, oracle: float, share: float, turns: int) -> str:
    """How much of the distance from random routing to the label oracle a cloud share covers; "-" where
    there is no distance worth a turn (the local model alone reaches alpha, or is wrong where the cloud is
    right on every turn but fewer than one: the ratio would then be a turn's rounding blown up) or no oracle
    (alpha is out of reach)."""
    gap = needs - oracle
    return f"{(needs - share) / gap:.2f}" if gap >= 1 / turns else "-"


def oracle_cloud_share(trace: list[Turn], alpha: float) -> float:
    """The least cloud share that reaches ``alpha`` knowing every label in advance: local wherever the
    local model satisfies, cloud only where it does not and the cloud does, and only as often as needed."""
    n = len(trace)
    free = sum(t.row["models"][LOCAL]["satisfied"] for t in trace)
    rescuable = sum(1 for t in trace if not t.row["models"][LOCAL]["satisfied"] and t.row["models"][CLOUD]["satisfied"])
    needed = max(0.0, alpha * n - free)
    return needed / n if needed <= rescuable else float("nan")


def task_oracle_cloud_share(trace: list[Turn], alpha: float) -> float:
    """The least cloud share that reaches ``alpha`` knowing each task's true accuracy for both models but no
    single label (the issue's "knows each task's accuracy"): whole tasks go to the cloud in the order of
    what the cloud adds, the last one in part."""
    tasks: dict[str, list[Turn]] = {}
    for t in trace:
        tasks.setdefault(t.row["task"], []).append(t)
    gains = sorted(((accuracy(ts, CLOUD) - accuracy(ts, LOCAL), len(ts)) for ts in tasks.values()), reverse=True)
    needed, sent = alpha * len(trace) - accuracy(trace, LOCAL) * len(trace), 0.0
    for gain, n in gains:
        if needed <= 0 or gain <= 0:
            break
        part = min(n, needed / gain)
        sent, needed = sent + part, needed - part * gain
    return sent / len(trace) if needed <= 1e-9 else float("nan")


def accuracy(trace: list[Turn], model: str) -> float:
    return sum(t.row["models"][model]["satisfied"] for t in trace) / len(trace)


def routers(
    trace: list[Turn], alpha: float, args: argparse.Namespace, prior: Prior | None, seed: int
) -> list[Callable[[], Run]]:
    def mess(p: Prior | None = None) -> MessPlus:
        m = new_messplus(alpha, args.v, args.explore_c, seed, p)
        if trace[0].local_x is not None:  # the local head reads more features than MESS+'s: those start at 0
            extra = len(trace[0].local_x[0]) - len(trace[0].x[0])
            m.state.weights[LOCAL] = np.concatenate([m.state.weights[LOCAL], np.zeros(extra)])
        return m

    def grader() -> Grader:
        return Grader(args.grader_error, random.Random(seed + 1))

    v = f"V = {args.v:g}"
    out = [
        lambda: paper_rule(trace, alpha, 1.0, args.explore_c, seed),
        lambda: price_rule(trace, mess(), f"price rule, {v}, cold", None),
        lambda: price_rule(trace, mess(), f"price rule + shadows, {v}, cold", grader()),
    ]
    if prior is not None:
        out.append(lambda: price_rule(trace, mess(prior), f"price rule + shadows + prior, {v}", grader()))
    if trace[0].conf is not None:
        name = f"escalate if unsure{' + prior' if prior else ''}, {v}"
        out.append(lambda: escalating(trace, mess(prior), name, grader()))
    return out


def folds(trace: list[dict], split: str) -> list[tuple[str, Prior | None, list[dict]]]:  # type: ignore[type-arg]
    """(name, prior, turns replayed): the whole trace cold, or with the prior shipped for its local GGUF
    (a fresh install's start), or each part with the prior fitted on the other part."""
    if split == "none":
        return [("whole trace, cold", None, trace)]
    if split == "shipped":
        return [shipped(trace)]
    if split == "half":
        if len(trace) < 2:
            raise SystemExit(f"--split half needs two turns or more (the trace has {len(trace)}): --split none")
        a, b = trace[: len(trace) // 2], trace[len(trace) // 2 :]
        return [
            ("second half, prior from the first", fit(a, "", 0, "first half"), b),
            ("first half, prior from the second", fit(b, "", 0, "second half"), a),
        ]
    groups = task_groups(trace)
    if not all(groups):
        only = ", ".join(sorted(groups[0] | groups[1]))
        raise SystemExit(f"--split task needs two tasks or more (the trace has one: {only}): --split none or half")
    parts = [[r for r in trace if r["task"] in group] for group in groups]
    names = [", ".join(sorted(group)) for group in groups]
    return [
        (f"tasks {names[1]}, prior from {names[0]}", fit(parts[0], "", 0, names[0]), parts[1]),
        (f"tasks {names[0]}, prior from {names[1]}", fit(parts[1], "", 0, names[1]), parts[0]),
    ]


def shipped(trace: list[dict]) -> tuple[str, Prior, list[dict]]:  # type: ignore[type-arg]
    """The whole trace from the prior shipped for the GGUF that answered it (policy/priors)."""
    sha = trace[0]["models"][LOCAL].get("gguf_sha256", "")
    path = PRIORS / f"{sha}.npz"
    if not sha or not path.exists():
        raise SystemExit(
            f"no prior is shipped for this trace's local GGUF (sha256 {sha or 'not in the trace'}): --split none "
            "replays it as a fresh install starts with that model; scripts/fit_prior.py fits one"
        )
    prior = read_prior(path)
    name = f"whole trace, shipped prior ({prior.source})"
    return name, prior, trace


def table(name: str, trace: list[Turn], prior: Prior | None, args: argparse.Namespace) -> dict[float, list[Run]]:
    local, cloud = accuracy(trace, LOCAL), accuracy(trace, CLOUD)
    best = sum(any(t.row["models"][m]["satisfied"] for m in (LOCAL, CLOUD)) for t in trace) / len(trace)
    print(f"\n### {name}: {len(trace)} turns; always-local {local:.3f}, always-cloud {cloud:.3f}", end="")
    print(f", the best any routing reaches {best:.3f} (an alpha above it is out of reach)\n")
    print(
        "| alpha | router | satisfaction | SLA violation | cloud share | capture | escalated | cost vs cloud |", end=""
    )
    print(" latency (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    cloud_usd = sum(t.row["models"][CLOUD]["usd"] for t in trace) or 1.0
    runs: dict[float, list[Run]] = {}
    for alpha in args.alphas:
        needs, oracle = random_needs(alpha, local, cloud), oracle_cloud_share(trace, alpha)
        by_task = task_oracle_cloud_share(trace, alpha)
        for name, share in (("random needs", needs), ("label oracle", oracle), ("task oracle", by_task)):
            if np.isnan(share):
                print(f"| {alpha} | {name} | - | - | out of reach | - | - | - | - |")
                continue
            covered = capture(needs, oracle, share, len(trace))
            print(f"| {alpha} | {name} | {alpha:.3f} | 0.000 | {share:.3f} | {covered} | - | - | - |")
        by_seed = [[make() for make in routers(trace, alpha, args, prior, seed)] for seed in args.seed]
        runs[alpha] = by_seed[0]
        for same in zip(*by_seed):  # one router over the seeds
            print(router_row(alpha, same, (needs, oracle), cloud_usd))
        shadow = [r for r in runs[alpha] if r.shadows]
        for r in shadow[-1:]:
            print(
                f"| {alpha} | ({r.shadows} shadow labels in seed {args.seed[0]}'s last run, {r.shadow_errors} wrong)",
                end="",
            )
            print(" |||||||")
    return runs


def router_row(alpha: float, runs: tuple[Run, ...], yardsticks: tuple[float, float], cloud_usd: float) -> str:
    """One router's row: its means over the seeds, and with several seeds the range of its capture and in
    how many of them it missed the SLA, so no figure reads finer than the seeds agree."""
    n = len(runs[0].satisfied)
    sats = [sum(r.satisfied) / n for r in runs]
    shares = [sum(r.clouds) / n for r in runs]
    missed = sum(sat < alpha - 0.005 for sat in sats)
    covered = capture(*yardsticks, fmean(shares), n)
    if len(runs) > 1 and covered != "-":
        each = sorted(float(capture(*yardsticks, share, n)) for share in shares)
        covered += f" ({each[0]:.2f} to {each[-1]:.2f})"
    if missed:
        covered += " (SLA missed)" if len(runs) == 1 else f" (SLA missed in {missed} of {len(runs)} seeds)"
    return (
        f"| {alpha} | {runs[0].name} | {fmean(sats):.3f} | {fmean([max(0.0, alpha - s) for s in sats]):.3f} | "
        f"{fmean(shares):.3f} | {covered} | {fmean([r.escalated / n for r in runs]):.3f} | "
        f"{fmean([r.usd / cloud_usd for r in runs]):.3f} | {fmean([r.latency_s / n for r in runs]):.3f} |"
    )


def plot(runs: dict[float, list[Run]], out: Path) -> None:
    fig, axes = plt.subplots(2, len(runs), figsize=(4 * len(runs), 6.5), sharex=True, squeeze=False)
    for col, (alpha, rs) in enumerate(runs.items()):
        top, bottom = axes[0][col], axes[1][col]
        for run in rs:
            n = np.arange(1, len(run.satisfied) + 1)
            top.plot(np.cumsum(run.satisfied) / n, label=run.name, linewidth=0.9)
            bottom.plot(run.q, linewidth=0.9)
        top.axhline(alpha, color="black", linestyle="--", linewidth=0.8)
        top.set_title(f"alpha = {alpha}")
        top.set_ylim(0, 1)
        bottom.set_xlabel("turn")
        if col == 0:
            top.set_ylabel("time-average satisfaction")
            bottom.set_ylabel("queue (Q before, Z after)")
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "replay_messplus.png", dpi=110)
    print(f"\nplot: {out / 'replay_messplus.png'}")


def conditions(trace: Path, args: argparse.Namespace) -> str:
    """What the tables rest on besides the trace's labels, said before them: the seed, the parameters, the
    simulated grader's error rate and how the trace's cloud labels were made (its .meta.json)."""
    meta = trace.with_suffix(".meta.json")
    cloud = json.loads(meta.read_text()).get("cloud_label", "not stated") if meta.exists() else f"no {meta.name}"
    return (
        f"{seeds(args.seed)}, V = {args.v:g}, exploration c = "
        f"{args.explore_c:g}; shadow grader: wrong where the cloud's answer is, and at --grader-error "
        f"{args.grader_error:g} besides; cloud labels: {cloud}"
    )


def seeds(chosen: list[int]) -> str:
    if len(chosen) > 1:
        return f"seeds {', '.join(map(str, chosen))} (each router's row: means, capture's range in brackets)"
    return (
        f"seed {chosen[0]} (one seed: on a few hundred turns capture moves by tenths between seeds; --seed 1 2 3 "
        "shows the range)"
    )


def default_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """docs/img only for the run whose plot docs/routing.md shows (the development trace, --split half, seed 1,
    V, c, alphas and grader error at their defaults), so the doc's other commands leave that figure alone; else
    beside the trace."""
    defaults = all(getattr(args, name) == parser.get_default(name) for name in FIGURE_OPTIONS)
    shown = Path(args.trace).resolve() == DEV_TRACE and args.seed[0] == 1 and defaults
    return REPO / "docs/img" if shown else Path(args.trace).parent


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEV_TRACE), help="trace to replay (default: the development trace)")
    parser.add_argument(
        "--out",
        help="folder for replay_messplus.png: docs/img for the run docs/routing.md shows, else the trace's ('' none)",
    )
    parser.add_argument(
        "--split",
        choices=("none", "shipped", "half", "task"),
        default="half",
        help="none: cold start; shipped: from the prior shipped for the trace's GGUF; half / task: each part from a "
        "prior fitted on the other (default: half)",
    )
    parser.add_argument("--v", type=float, default=DAEMON.v, help=f"MESS+'s V (default: {DAEMON.v:g}, routing.v)")
    parser.add_argument(
        "--explore-c",
        type=float,
        default=DAEMON.explore_c,
        help=f"exploration c (default: {DAEMON.explore_c:g}, routing.explore_c)",
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="SLA targets (default: 0.5-0.8)")
    parser.add_argument("--grader-error", type=float, default=0.05, help="shadow grader's error rate (default: 0.05)")
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[1], help="one or more seeds: rows are means, capture's range shown"
    )
    return parser


def main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    trace = read_trace(Path(args.trace))
    if args.out is None:
        args.out = str(default_out(args, parser))
    print(conditions(Path(args.trace), args))
    if "logprobs" not in trace[0]["models"][LOCAL]:
        print("this trace has no log-probs: the routers do without the local answer's confidence")
    for i, (name, prior, replayed) in enumerate(folds(trace, args.split)):
        runs = table(name, turns(replayed), prior, args)
        if i == 0 and args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            plot(runs, Path(args.out))


if __name__ == "__main__":
    main()
