"""Evaluate offloading strategies on held-out OffloadEnv episodes: the same episodes, budgets and seeds for
every strategy, so their rows compare."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from locod.policy import rule
from locod.policy.load import wait_cost
from locod.policy.messplus import MessPlus, vectorize
from locod.policy.observation import FEATURE_NAMES, N_ACTIONS, SUBSETS, WAIT_CAP_S, K, Slot
from locod.policy.tasks import TASKS
from locod.policy.tmo_env import (
    CLOUD_USD,
    OffloadEnv,
    TurnOutcomes,
    TurnSource,
    normalised,
    waited,
    window_after,
)

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
    load_p: float = 0.0,
) -> Scores:
    env = OffloadEnv(sources, seed=seed, budget_span=budget_span, shield=shield, load_p=load_p)
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
        value = mean_reward(self.env, turn, waited(turn.expected_spend()[0], self.env.wait_s()))
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
            self.plan = self.best_from(0, [], self.env.ahead)[1]
        return self.plan[self.env.index]

    def best_from(self, index: int, recent: list[np.ndarray], ahead: float) -> tuple[float, list[int]]:
        """The best plan from turn ``index`` on, with the window's ``recent`` spend and ``ahead`` turns queued."""
        if index == len(self.env.turns):
            return 0.0, []
        turn, queue = self.env.turns[index], self.env.queue
        value = mean_reward(self.env, turn, waited(turn.latency, queue.wait_s(ahead)))
        options = []
        for action in np.flatnonzero(self.env.shielded(turn, recent)):
            later, rest = self.best_from(
                index + 1, window_after(recent, turn.spend(int(action))), queue.after(ahead, index, action == 0)
            )
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
    """The rule the daemon runs (locod.policy.rule): MESS+ over the environment's actions, optionally
        combined with a policy's log-probabilities. Learns online from each step.

        Inputs the environment does not have are left at what a first turn would see: no dialogue position, no
        previous location, the task's name in place of the prompt's words. Costs are TMO's prices per action,
    and for a local answer the wait behind the local queue (policy/load.py), as in the daemon."""

    def __init__(
        self,
        sla: float,
        log_pi: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        weight: float = 0.5,
        v: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.mess = MessPlus(
            rule.priors(["local"], ["cloud"]), sla=sla, v=v, explore_c=0.2, q_cap=50.0, rng=random.Random(seed)
        )
        self.log_pi, self.weight = log_pi, weight
        self.t = 0
        self.last: tuple[tuple[np.ndarray, np.ndarray], str] | None = None

    def __call__(self, obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        task = TASKS[int(np.argmax([obs[FEATURE_NAMES.index(f"task_{t}")] for t in TASKS]))]
        slots = [
            Slot(
                float(obs[FEATURE_NAMES.index(f"slot{k}_relevance")]), bool(obs[FEATURE_NAMES.index(f"slot{k}_image")])
            )
            for k in range(K)
            if obs[FEATURE_NAMES.index(f"slot{k}_present")]
        ]
        allowed = [a for a in range(N_ACTIONS) if mask[a]]
        if self.log_pi is None:  # MESS+ alone: the local model, or the cloud with the rule's one upload choice
            relevant = rule.relevant_uploads(slots, range(len(slots)))
            upload = 1 + SUBSETS.index(relevant)
            allowed = [a for a in allowed if a in (0, upload if mask[upload] else 1)] or allowed
        features = {str(a): rule.action_features(task, task, slots, SUBSETS[a - 1] if a else None) for a in allowed}
        model_of = {key: "local" if key == "0" else "cloud" for key in features}
        s_hat = dict(zip(features, self.mess.satisfaction_of_turn(list(features.values()), list(model_of.values()))))
        costs = {str(a): TMO_COST[a] for a in allowed}
        if "0" in costs:  # as the daemon charges it: the local queue's wait, read back from the observation
            costs["0"] += wait_cost(math.expm1(float(obs[_WAIT]) * math.log1p(WAIT_CAP_S)))
        log_pi = None
        if self.log_pi is not None:
            values = self.log_pi(obs, mask)
            log_pi = {str(a): float(values[a]) for a in allowed}
        choice = rule.choose(self.mess, costs, s_hat, model_of, log_pi, self.weight)
        self.t += 1
        self.mess.settle(self.t, choice.model, choice.s_hat[choice.key])
        self.last = (vectorize(features[choice.key]), choice.model)
        return int(choice.key)

    def learn(self, info: dict[str, object]) -> None:
        if self.last is not None:
            x, model = self.last
            self.mess.label(self.t, model, x, float(info["quality"]) >= SATISFIED_AT)  # type: ignore[arg-type]


# Each action's cost for the rule: TMO's cloud price by upload count, over the largest; local generation
# costs device energy, priced like the cheapest cloud call.
TMO_COST = (0.0357, *(CLOUD_USD[len(s)] / CLOUD_USD[-1] for s in SUBSETS))
_WAIT = FEATURE_NAMES.index("local_wait")
