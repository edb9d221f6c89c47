"""`locod policy train`'s options and entry: parsed (and ``--help`` shown) without PyTorch, which is
imported only when training really starts (the `train` extra)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from locod.errors import LocodError, install_hint
from locod.words import ascii_number


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200_000
    rollout: int = 2048
    epochs: int = 10
    minibatch: int = 256
    gamma: float = 0.95
    lam: float = 0.95
    clip: float = 0.2
    lr: float = 3e-4
    entropy: float = 0.003
    hidden: int = 64
    seed: int = 0
    load_p: float = 0.5  # episodes whose local queue is under load (tmo_env.LocalQueue)


def parser(default_out: Path | None = None) -> argparse.ArgumentParser:
    """`locod policy train`'s options (default_out: the state directory's policy.onnx, which the daemon
    loads), or scripts/train_policy.py's (./policy.onnx, which no daemon loads until it is moved there)."""
    p = argparse.ArgumentParser(
        prog="locod policy train" if default_out else None,
        description="Train the TMO offloading policy (RC-PPO) and export it to ONNX.",
    )
    loaded = (
        "which the daemon loads at its next start or `locod reload` when routing.policy_path is unset"
        if default_out
        else "which no daemon loads: `locod policy train` writes where the daemon looks"
    )
    p.add_argument(
        "--out",
        default=str(default_out or "policy.onnx"),
        help=f"where to write the ONNX policy (default: %(default)s, {loaded})",
    )
    p.add_argument(
        "--trace",
        default=str(Path(__file__).resolve().parent / "data" / "bigbench_trace.jsonl"),  # shipped in the package
        help="replay trace whose dialogues are mixed into training (weight 0.3, the simulator 0.7): any trace "
        "build_trace.py makes, its one local model whatever its name (default: the shipped development trace)",
    )
    p.add_argument(
        "--from-db", metavar="LOCOD.DB", help="also train on this device's labelled decision log (its locod.db)"
    )
    p.add_argument(
        "--steps",
        type=_steps,
        default=TrainConfig.steps,
        help=f"environment steps, 1 or more, run in whole rollouts of {TrainConfig.rollout} (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=ascii_number(int), default=TrainConfig.seed, help="random seed (default: %(default)s)"
    )
    return p


def _steps(text: str) -> int:
    """``--steps``, 1 or more: 0 or fewer trained nothing and exported the untrained network as a policy (worse
    than random at routing), where the daemon loads it at its next reload."""
    try:
        steps = ascii_number(int)(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise argparse.ArgumentTypeError(f"expects a number of steps, 1 or more, got {text!r}")
    return steps


def main(argv: Sequence[str] | None = None, default_out: Path | None = None) -> int:
    """`locod policy train` and scripts/train_policy.py: train, export, check parity, report. The policy is
    written to ``default_out`` (the state directory's policy.onnx, which the daemon loads when
    routing.policy_path is unset) unless ``--out`` says otherwise; never over the shipped one by default."""
    args = parser(default_out).parse_args(argv)
    try:
        from locod.policy.train import train_and_report
    except ImportError as exc:
        raise LocodError(f"training needs the train extra ({exc}): {install_hint('train')}") from None
    config = TrainConfig(steps=args.steps, seed=args.seed)
    return train_and_report(Path(args.trace), Path(args.from_db) if args.from_db else None, Path(args.out), config)
