"""RC-PPO: train the offloading policy on OffloadEnv and export it to ONNX (needs the `train` extra).

PPO with invalid actions masked out of the softmax, the remaining budgets in the observation and a
penalty (``-OVERRUN_PENALTY`` in place of the step's reward) for budget-overrunning steps (tmo_env.py) is
the resource-constrained variant of TMO. Training is
seeded and runs in minutes on two CPU cores. The exported graph takes ``observation`` [batch, OBS_DIM]
and ``mask`` [batch, N_ACTIONS] (1 = allowed) and returns ``log_probs`` [batch, N_ACTIONS]; the layout
version, K, Z, feature and action names and the training data's hash travel in its metadata_props.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from locod.daemon.regular_file import replace_on_disk
from locod.errors import PolicyError
from locod.policy.observation import ACTION_NAMES, FEATURE_NAMES, LAYOUT_VERSION, N_ACTIONS, OBS_DIM, K, Z
from locod.policy.tmo_env import OffloadEnv, TurnSource
from locod.policy.train_cli import TrainConfig

OPSET = 17
MASKED = -1e9
PARITY_TOLERANCE = 1e-5  # the most torch and onnxruntime may differ by (float32 rounding)


class Policy(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.actor = nn.Sequential(
            nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, N_ACTIONS)
        )
        self.critic = nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, observation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked log-probabilities: the exported graph."""
        return torch.log_softmax(self.actor(observation) + (1.0 - mask) * MASKED, dim=-1)


DEFAULT_CONFIG = TrainConfig()


def train(
    sources: Sequence[tuple[TurnSource, float]],
    config: TrainConfig = DEFAULT_CONFIG,
    progress: Callable[[str], None] | None = None,
) -> Policy:
    """RC-PPO on episodes drawn from ``sources`` (weighted); ``progress`` hears a line per rollout."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    torch.set_num_threads(2)
    env = OffloadEnv(sources, seed=config.seed, load_p=config.load_p)
    policy = Policy(config.hidden)
    optimiser = torch.optim.Adam(policy.parameters(), lr=config.lr)
    obs, info = env.reset(seed=config.seed)
    mask = info["action_mask"]
    done_steps = 0
    while done_steps < config.steps:
        batch: dict[str, list[Any]] = {k: [] for k in ("obs", "mask", "action", "logp", "reward", "done", "value")}
        for _ in range(config.rollout):
            with torch.no_grad():
                o, m = torch.as_tensor(obs)[None], torch.as_tensor(mask)[None]
                logp = policy(o, m)[0]
                action = int(torch.multinomial(logp.exp(), 1))
                value = float(policy.critic(o)[0, 0])
            next_obs, reward, done, _, info = env.step(action)
            for key, v in (
                ("obs", obs),
                ("mask", mask),
                ("action", action),
                ("logp", float(logp[action])),
                ("reward", reward),
                ("done", done),
                ("value", value),
            ):
                batch[key].append(v)
            obs, mask = next_obs, info["action_mask"]
            if done:
                obs, info = env.reset()
                mask = info["action_mask"]
        done_steps += config.rollout
        _update(policy, optimiser, batch, config)
        if progress is not None:
            progress(f"{done_steps} steps: mean reward {np.mean(batch['reward']):.4f}")
    return policy


def _update(policy: Policy, optimiser: torch.optim.Optimizer, batch: dict[str, list[Any]], config: TrainConfig) -> None:
    rewards, dones, values = (np.array(batch[k], dtype=np.float64) for k in ("reward", "done", "value"))
    advantages = np.zeros_like(rewards)
    gae = 0.0
    for t in reversed(range(len(rewards))):
        next_value = 0.0 if dones[t] or t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + config.gamma * next_value - values[t]
        gae = delta + config.gamma * config.lam * (0.0 if dones[t] else gae)
        advantages[t] = gae
    returns = advantages + values
    obs = torch.as_tensor(np.array(batch["obs"]))
    masks = torch.as_tensor(np.array(batch["mask"]))
    actions = torch.as_tensor(batch["action"])
    old_logp = torch.as_tensor(batch["logp"], dtype=torch.float32)
    adv = torch.as_tensor((advantages - advantages.mean()) / (advantages.std() + 1e-8), dtype=torch.float32)
    ret = torch.as_tensor(returns, dtype=torch.float32)
    n = len(rewards)
    for _ in range(config.epochs):
        order = torch.randperm(n)
        for start in range(0, n, config.minibatch):
            idx = order[start : start + config.minibatch]
            logp_all = policy(obs[idx], masks[idx])
            logp = logp_all.gather(1, actions[idx, None])[:, 0]
            ratio = torch.exp(logp - old_logp[idx])
            surrogate = torch.min(ratio * adv[idx], torch.clamp(ratio, 1 - config.clip, 1 + config.clip) * adv[idx])
            probs = logp_all.exp()
            entropy = -(probs * torch.where(masks[idx] > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
            value_loss = (policy.critic(obs[idx])[:, 0] - ret[idx]).pow(2)
            loss = -surrogate.mean() + 0.5 * value_loss.mean() - config.entropy * entropy.mean()
            optimiser.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            optimiser.step()


def data_hash(paths: Sequence[Path]) -> str:
    """The SHA-256 of the files trained on, read a megabyte at a time: a year's decision log is a gigabyte,
    which read whole took as much memory (twice, with the version's hash)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def export(policy: Policy, path: Path, *, version: str, data_sha256: str, config: TrainConfig) -> float:
    """Write the policy, its metadata included, beside ``path``, check it computes what ``policy`` does, and
    only then rename it over ``path``: the daemon may load ``path`` at any moment (a start, a SIGHUP), and
    training killed mid-write, or a graph that exported wrong, must leave the policy trained before it
    whole. The torch/ONNX max abs difference (``parity``); ``path`` is left as it was when it is not below
    PARITY_TOLERANCE."""
    import onnx

    policy.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        example = (torch.zeros(1, OBS_DIM), torch.ones(1, N_ACTIONS))
        torch.onnx.export(
            policy,
            example,
            str(tmp),
            input_names=["observation", "mask"],
            output_names=["log_probs"],
            dynamic_axes={"observation": {0: "batch"}, "mask": {0: "batch"}, "log_probs": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        model = onnx.load(str(tmp))
        meta = {
            "locod.layout_version": str(LAYOUT_VERSION),
            "locod.policy_version": version,
            "locod.k": str(K),
            "locod.z": str(Z),
            "locod.obs_dim": str(OBS_DIM),
            "locod.n_actions": str(N_ACTIONS),
            "locod.feature_names": json.dumps(FEATURE_NAMES),
            "locod.action_names": json.dumps(ACTION_NAMES),
            "locod.normalisation": "features pre-scaled to [0, 1] as documented in locod.policy.observation",
            "locod.training_data_sha256": data_sha256,
            "locod.train_config": json.dumps(vars(config)),
        }
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        diff = parity(policy, tmp)
        if diff < PARITY_TOLERANCE:
            replace_on_disk(tmp, path)
        return diff
    finally:
        tmp.unlink(missing_ok=True)


def parity(policy: Policy, path: Path, n: int = 1000, seed: int = 0) -> float:
    """Max |torch - onnxruntime| over ``n`` random observations and random non-empty masks."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    obs = rng.random((n, OBS_DIM), dtype=np.float32)
    mask = (rng.random((n, N_ACTIONS)) < 0.6).astype(np.float32)
    mask[:, 0] = 1.0
    with torch.no_grad():
        expected = policy(torch.as_tensor(obs), torch.as_tensor(mask)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"observation": obs, "mask": mask})[0]
    allowed = mask > 0  # masked entries are ~ -1e9 on both sides; compare the probabilities that matter
    return float(np.abs(expected[allowed] - got[allowed]).max())


def train_and_report(trace: Path, from_db: Path | None, out: Path, config: TrainConfig) -> int:
    """Train on ``trace`` (and ``from_db``'s labelled turns), export to ``out``, check parity, and compare
    the policy with the heuristics; 0 when the ONNX graph matches torch."""
    from locod.daemon.records import labelled_turns
    from locod.policy.evaluate import heuristics, run
    from locod.policy.tmo_env import LogSource, default_sources

    if not trace.is_file():
        raise PolicyError(f"--trace {trace}: no such file", code="trace_missing")
    sources = default_sources(trace)
    inputs = [trace]
    if from_db:
        try:
            sources.append((LogSource(labelled_turns(from_db)), 0.5))
        except ValueError as exc:
            raise PolicyError(f"--from-db {from_db}: {exc}", code="too_few_labels") from None
        inputs.append(from_db)
    policy = train(sources, config, progress=lambda line: print(line, flush=True))
    weights = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in policy.state_dict().values()))
    # seed, length and data say how it was made; the weights' hash tells apart policies made by other code
    data = data_hash(inputs)
    version = f"rcppo-s{config.seed}-{config.steps // 1000}k-{data[:8]}-{weights.hexdigest()[:6]}"
    diff = export(policy, out, version=version, data_sha256=data, config=config)
    if diff >= PARITY_TOLERANCE:
        print(
            f"not exported: the ONNX graph differs from the trained policy by {diff:.2e}; {out} left as it was",
            file=sys.stderr,
        )
    else:
        size = out.stat().st_size
        print(f"exported {out} ({size} bytes), policy version {version}, torch/ONNX max abs diff {diff:.2e}")

    def greedy(obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        with torch.no_grad():
            return int(policy(torch.as_tensor(obs)[None], torch.as_tensor(mask)[None]).argmax())

    for name, strategy in {**heuristics(), "RC-PPO policy": greedy}.items():
        s = run(strategy, sources, episodes=300, load_p=config.load_p)
        print(f"{name:>24}: reward {s.reward:.4f}, budget violations {s.violations}, cloud share {s.cloud_share:.2f}")
    return 0 if diff < PARITY_TOLERANCE else 1
