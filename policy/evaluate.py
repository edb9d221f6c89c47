"""Evaluate offloading strategies on held-out OffloadEnv episodes: the same episodes, budgets and seeds for
every strategy, so their rows compare."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from locod.policy.messplus import MessPlus, TurnFeatures, vectorize
from locod.policy.observation import CLOUD_ACTIONS_COST, FEATURE_NAMES, N_ACTIONS, SUBSETS, TASKS
from locod.policy.tmo_env import OffloadEnv, TurnOutcomes, TurnSource, normalised, window_after

Strategy = Callable[[np.ndarray, np.ndarray, random.Random], int]


@dataclass
class Scores:
    reward: float
    quality: float
    latency_s: float
    usd: float
    energy_j: float
    violations: int  # episodes that overran a budget
    cloud_share: float
    uploads: float  # attachments sent per turn
    turns: int
    satisfaction: float  # share of turns with quality >= SATISFIED_AT (the SLA's measure)


def run(
    strategy: Strategy,
    sources: Sequence[tuple[TurnSource, float]],
    episodes: int = 500,
    seed: int = 12345,
    budget_span: tuple[float, float] | None = None,
    shield: bool = True,
) -> Scores:
    env = OffloadEnv(sources, seed=seed, budget_span=budget_span, shield=shield)
    rng = random.Random(seed + 1)
    totals = np.zeros(7)  # reward, quality, latency, usd, energy, uploads, cloud turns
    violations = turns = satisfied = 0
    bind = getattr(strategy, "bind", None)  # a yardstick that reads the episode itself (the oracle)
    if bind is not None:
        bind(env)
    for _ in range(episodes):
        obs, info = env.reset()
        done = overran = False
        while not done:
            action = strategy(obs, info["action_mask"], rng)
            obs, reward, done, _, info = env.step(action)
            learn = getattr(strategy, "learn", None)
            if learn is not None:
                learn(info)
            satisfied += info["quality"] >= SATISFIED_AT
            totals += [
                reward,
                info["quality"],
                info["latency"],
                info["usd"],
                info["energy"],
                info["uploads"],
                action != 0,
            ]
            turns += 1
            overran = overran or info["violation"]
        violations += overran
    mean = totals / turns
    return Scores(
        reward=mean[0],
        quality=mean[1],
        latency_s=mean[2],
        usd=mean[3],
        energy_j=mean[4],
        violations=violations,
        cloud_share=mean[6],
        uploads=mean[5],
        turns=turns,
        satisfaction=satisfied / turns,
    )


def heuristics() -> dict[str, Strategy]:
    def local(obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        return 0 if mask[0] else int(np.flatnonzero(mask)[0])

    def cloud_text(obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        return 1 if mask[1] else local(obs, mask, rng)

    def cloud_all(obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        """Every attachment; when the shield allows fewer, the most that fit, the most relevant first."""
        allowed = [a for a in range(1, N_ACTIONS) if mask[a]]
        return max(allowed, key=lambda a: (len(SUBSETS[a - 1]), -a)) if allowed else local(obs, mask, rng)

    def uniform(obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        return rng.choice([a for a in range(N_ACTIONS) if mask[a]])

    return {"local only": local, "cloud, text only": cloud_text, "cloud, all attachments": cloud_all, "random": uniform}


class ExpectedRewardOracle:
    """A yardstick, not something a device could run: it knows the simulator's mean quality of every action
    and takes the best expected reward of the turn among what the shield allows (one turn ahead only)."""

    def bind(self, env: OffloadEnv) -> None:
        self.env = env

    def __call__(self, obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        turn = self.env.turns[self.env.index]
        value = mean_reward(self.env, turn, turn.expected_spend()[0])
        return int(np.argmax(np.where(mask > 0, value, -np.inf)))


class ClairvoyantPlan:
    """A higher yardstick: it also knows every turn of the episode ahead, with its outcome but the quality
    noise, and plays the sequence of shielded actions with the most mean reward (searched exhaustively;
    dialogues are short). A strategy that sees one turn at a time should not expect to beat it (up to how
    clipping bends the quality's mean at its ends)."""

    def bind(self, env: OffloadEnv) -> None:
        self.env = env
        self.plan: list[int] = []

    def __call__(self, obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        if self.env.index == 0:
            self.plan = self.best_from(0, [])[1]
        return self.plan[self.env.index]

    def best_from(self, index: int, recent: list[np.ndarray]) -> tuple[float, list[int]]:
        if index == len(self.env.turns):
            return 0.0, []
        turn = self.env.turns[index]
        value = mean_reward(self.env, turn, turn.latency)
        options = []
        for action in np.flatnonzero(self.env.shielded(turn, recent)):
            later, rest = self.best_from(index + 1, window_after(recent, turn.spend(int(action))))
            options.append((float(value[action]) + later, [int(action), *rest]))
        return max(options, key=lambda option: option[0])


def mean_reward(env: OffloadEnv, turn: TurnOutcomes, latency: np.ndarray) -> np.ndarray:
    """Each action's reward with the simulator's mean quality in place of the sampled one."""
    if turn.quality_mean is None:
        raise ValueError("this yardstick needs a turn source that knows its mean quality (the simulator)")
    allowed, w = turn.mask > 0, env.weights
    return (
        w.quality * np.clip(turn.quality_mean, 0.0, 1.0)
        + w.association * turn.association
        - w.latency * normalised(latency, allowed)
        - w.cost * normalised(turn.usd, allowed)
    )


SATISFIED_AT = 0.5  # a simulated answer of quality >= 0.5 (on 0-1) counts as satisfying


class Router:
    """MESS+ over the environment's actions, optionally combined with a policy's log-probabilities:
    argmin V*cost + Q*(alpha - s_hat) - w*log pi, the rule the daemon runs. Learns online from each step."""

    def __init__(
        self,
        sla: float,
        log_pi: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        weight: float = 0.5,
        v: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.mess = MessPlus(
            {"local": 0.5, "cloud": 0.85}, sla=sla, v=v, explore_c=0.2, q_cap=50.0, rng=random.Random(seed)
        )
        self.log_pi, self.weight = log_pi, weight
        self.t = 0
        self.last: tuple[object, str] | None = None

    def __call__(self, obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        task = TASKS[int(np.argmax([obs[FEATURE_NAMES.index(f"task_{t}")] for t in TASKS]))]
        relevance = [float(obs[FEATURE_NAMES.index(f"slot{k}_relevance")]) for k in range(3)]
        allowed = [a for a in range(N_ACTIONS) if mask[a]]
        if self.log_pi is None:
            # MESS+ alone picks the model; the cloud gets the relevant attachments (the daemon's rule)
            relevant = tuple(k for k in range(3) if relevance[k] >= 0.3)
            heuristic = 1 + SUBSETS.index(relevant) if relevant in SUBSETS and mask[1 + SUBSETS.index(relevant)] else 1
            allowed = [a for a in allowed if a in (0, heuristic)] or allowed
        xs = {str(a): vectorize(self._features(task, relevance, a)) for a in allowed}
        costs = {str(a): CLOUD_ACTIONS_COST[a] for a in allowed}
        model_of = {str(a): "local" if a == 0 else "cloud" for a in allowed}
        extra: dict[str, float] = {}
        if self.log_pi is not None:
            log_pi = self.log_pi(obs, mask)
            extra = {str(a): -self.weight * float(log_pi[a]) for a in allowed}
        choice = self.mess.choose(costs, xs=xs, extra=extra, model_of=model_of)
        self.t += 1
        self.mess.settle(self.t, choice.model, choice.s_hat[choice.key])
        self.last = (xs[choice.key], choice.model)
        return int(choice.key)

    @staticmethod
    def _features(task: str, relevance: list[float], action: int) -> TurnFeatures:
        """As the daemon does: what this action's model would see, and the best relevance it would not."""
        sent = SUBSETS[action - 1] if action else ()
        shown = [relevance[k] for k in sent]
        hidden = [r for k, r in enumerate(relevance) if k not in sent and r > 0]
        return TurnFeatures(
            prompt=task,
            task=task,
            n_attachments=len(shown),
            max_relevance=max(shown, default=0.0),
            has_image=bool(shown),
            withheld_relevance=max(hidden, default=0.0),
        )

    def learn(self, info: dict[str, object]) -> None:
        if self.last is not None:
            x, model = self.last
            self.mess.label(self.t, model, x, float(info["quality"]) >= SATISFIED_AT)  # type: ignore[arg-type]
