"""TMO's offloading problem as a gymnasium environment, with resource constraints (RC-RL).

An episode is a dialogue of a few turns. Each turn the agent picks an action of policy/observation.py
(local, or cloud with a subset of the K attachment slots). The reward is TMO's

    r = a * quality + b_assoc * association - b_lat * norm_latency - b_cost * norm_cost

with latency and cost min-max normalised over the turn's allowed actions.

Budgets (latency, money, energy) bound what any WINDOW consecutive turns spend, as in TMO's reference
environment, whose budgets cover its history window of Z turns: a rate, which is what a device has (a
day's money cap, a battery), rather than a total for a dialogue whose length nobody knows in advance.
They are sampled per episode between a floor, WINDOW local answers at their dearest, and the dearest
action's spend WINDOW times (normal, uniform, or near either end: TMO's extreme-aware sampling), so
which resource is scarce varies. The remaining fractions are in the observation, so one policy learns
budgets it was not trained on. A step that overruns earns nothing and a penalty of OVERRUN_PENALTY
(RC-RL's zero alone was too weak a signal to learn from in our runs).

The action mask is a shield, the same kind the daemon applies with its daily money cap: an action is
offered only if, after it, the window still has room for local answers on every turn to come. A local
answer's spend has a known upper bound (the source's ``local_bound``) and every budget covers WINDOW of
them, so the local answer always passes, and no strategy that picks from the mask can overrun, whatever
the later turns bring. This needs every action's *expected* spend (what a device knows before acting:
the published cloud latency with its +10 % spread, prices, its own generation speed) to bound its outcome.

The local model answers one turn at a time, and other clients' turns may be queued for it: a
``LocalQueue``, drawn per episode (under load in a share ``load_p`` of episodes, idle otherwise), makes
a local answer wait turns ahead x turn time, what the daemon estimates (policy/load.py). The observation
shows that wait; the reward charges it in the latency term (a local answer's latency is its wait plus its
own time), so a long queue favours the cloud where the budgets allow. The wait does not count against the
latency budget, which bounds the device's own work: the shield's guarantee needs a local answer's spend to
have a known bound, and a queue's wait has none.

Turns come from a ``TurnSource``: the ``Simulator`` (TMO's published cloud latency/cost by upload count
and network kind, a device profile, battery and network that change during the episode), the replay trace
of docs/routing.md (``TraceSource``), or this device's decision log (``LogSource``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from locod.policy.logged import LoggedTurn
from locod.policy.observation import (
    N_ACTIONS,
    OBS_DIM,
    SUBSETS,
    K,
    ObsInputs,
    PastTurn,
    Slot,
    Z,
    action_mask,
    observe,
)
from locod.policy.rule import RADIO_W
from locod.policy.tasks import TASKS, task_of
from locod.policy.trace import CLOUD, local_model, read_rows

# TMO's published figures (research notes): cloud latency by number of uploaded images k = 0..3.
CLOUD_LATENCY_S = {"wifi": (0.5, 1.9, 2.0, 2.2), "cellular": (0.5, 16.6, 17.6, 19.6), "ethernet": (0.4, 1.2, 1.3, 1.4)}
CLOUD_USD = (0.00049, 0.0050, 0.0095, 0.0137)
LOCAL_USD = 1e-8  # TMO's local cost per call
OVERRUN_PENALTY = 0.5
WINDOW = Z  # turns a budget covers: the policy sees this much history, so it sees what fills the window


@dataclass(frozen=True)
class Weights:
    quality: float = 1.0
    association: float = 1 / 3
    latency: float = 1 / 3
    cost: float = 1 / 3


@dataclass
class TurnOutcomes:
    """What every action would yield on one turn: quality, latency (s), money (USD), energy (J); what a
    device would expect each to spend before acting (rows latency, USD, J; recorded sources: the outcome);
    and, from the simulator, each action's mean quality (0-1, before noise and clipping)."""

    inputs: ObsInputs
    mask: np.ndarray
    quality: np.ndarray
    latency: np.ndarray
    usd: np.ndarray
    energy: np.ndarray
    association: np.ndarray
    expected: np.ndarray | None = None
    quality_mean: np.ndarray | None = None  # where the source knows it (the simulator): for the oracle

    def spend(self, action: int) -> np.ndarray:
        """What ``action`` spends: latency (s), USD, J."""
        return np.array([self.latency[action], self.usd[action], self.energy[action]])

    def expected_spend(self) -> np.ndarray:
        return self.expected if self.expected is not None else np.stack([self.latency, self.usd, self.energy])


class TurnSource(Protocol):
    def episode(self, rng: random.Random) -> list[TurnOutcomes]: ...

    @property
    def local_bound(self) -> np.ndarray:
        """The most a local answer spends (latency s, USD, J): the shield's reserve per turn to come."""
        ...


@dataclass(frozen=True)
class LocalQueue:
    """Other clients' turns ahead on the local model during an episode. Under load, the episode's turns stand
    for the device's stream in a burst of clients: the model finishes ``drained[t]`` turns between turn t
    and the next, other clients add ``arrivals[t]``, and a turn answered locally is one more turn ahead of
    the next, so the wait grows with local answers. Idle (the default): nothing is ever ahead."""

    turn_s: float = 1.0  # the local model's time per queued turn
    ahead: float = 0.0  # turns ahead of the episode's first turn
    arrivals: tuple[int, ...] = ()
    drained: tuple[float, ...] = ()

    def wait_s(self, ahead: float) -> float:
        return ahead * self.turn_s

    def after(self, ahead: float, index: int, local: bool) -> float:
        """The turns ahead of turn ``index + 1``, given those ahead of turn ``index`` and where it went."""
        if index >= len(self.drained):
            return 0.0
        return max(0.0, ahead + local - self.drained[index]) + self.arrivals[index]

    @classmethod
    def under_load(cls, rng: random.Random, turns: int) -> LocalQueue:
        """A burst: up to 12 turns ahead at the start, 1-6 more arriving before a third of the turns, turns
        0.2-1.5 of a local turn apart, and a local turn of 0.5-4 s (waits from none to minutes)."""
        arrivals = tuple(rng.randint(1, 6) if rng.random() < 0.3 else 0 for _ in range(turns))
        drained = tuple(rng.uniform(0.2, 1.5) for _ in range(turns))
        return cls(rng.uniform(0.5, 4.0), float(rng.randint(0, 12)), arrivals, drained)


def waited(latency: np.ndarray, wait_s: float) -> np.ndarray:
    """Each action's latency as the user sees it: a local answer (action 0) first waits for the queue."""
    out = latency.copy()
    out[0] += wait_s
    return out


def upload_bps(link: str) -> float:
    """The upload speed a simulated device observes on ``link``."""
    return 2e5 if link == "cellular" else 2e6


def window_after(recent: list[np.ndarray], spend: np.ndarray) -> list[np.ndarray]:
    """The spend of the last WINDOW - 1 turns once a turn has spent ``spend``."""
    return [*recent, spend][-(WINDOW - 1) :]


def normalised(values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Min-max normalised over the allowed actions (TMO's latency and cost terms); all zero if they tie."""
    lo, hi = values[allowed].min(), values[allowed].max()
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def association(slots: Sequence[Slot]) -> np.ndarray:
    """Per action: the share of this turn's attachment relevance that the action uploads."""
    total = sum(s.relevance for s in slots) or 1.0
    out = np.zeros(N_ACTIONS)
    for i, subset in enumerate(SUBSETS):
        out[1 + i] = sum(slots[k].relevance for k in subset if k < len(slots)) / total
    return out


@dataclass
class Simulator:
    """TMO's synthetic template made to move: network kind and battery change within an episode.

    Latency and money per upload count and network kind are TMO's published figures. Quality follows
    TMO's template (local N(0.7, 0.3), cloud N(1.0, 0.3) on a 0-2 scale) with one change that makes the
    modality choice matter: the cloud's answer gains up to +1.0 for uploading the turn's relevant
    attachments (in proportion to the relevance it uploads), and loses 0.5 when a highly relevant image
    (relevance > 0.7) is withheld; the local model, which sees no image, loses 0.3 on such turns.
    Attachment relevance is U(0, 1) rather than TMO's U(0.1, 0.5).
    """

    local_latency_s: tuple[float, float] = (0.4, 1.2)  # uniform range of a local answer's time
    device_w: float = 15.0  # Jetson TX2-class draw while generating (TMO's figure)
    links: tuple[str, ...] = ("wifi", "wifi", "cellular", "ethernet")  # where an episode starts
    switch_p: float = 0.15  # chance per turn of moving to another network (or out of reach)

    @property
    def local_bound(self) -> np.ndarray:
        slowest = self.local_latency_s[1]
        return np.array([slowest, LOCAL_USD, slowest * self.device_w])

    def episode(self, rng: random.Random) -> list[TurnOutcomes]:
        turns = rng.randint(2, 5)
        link = rng.choice(self.links)
        battery = rng.uniform(0.05, 1.0)
        on_ac = rng.random() < 0.3
        out = []
        for _ in range(turns):
            if rng.random() < self.switch_p:  # the device moves between networks, sometimes out of reach
                link = rng.choice(["wifi", "cellular", "none"])
            n = rng.choice([0, 1, 2, 3, 3])
            slots = [Slot(rng.random(), image=True, private=rng.random() < 0.1) for _ in range(n)]
            slots.sort(key=lambda s: -s.relevance)  # slots are filled most relevant first, as the daemon does
            task = rng.choice(TASKS)
            online = link != "none"
            mask = action_mask(slots, cloud_allowed=online)
            assoc = association(slots)
            local_s = rng.uniform(*self.local_latency_s)
            mean = self.quality_mean(slots, assoc)
            quality = np.zeros(N_ACTIONS)
            latency = np.zeros(N_ACTIONS)
            usd = np.zeros(N_ACTIONS)
            energy = np.zeros(N_ACTIONS)
            quality[0] = min(2.0, max(0.0, rng.gauss(mean[0], 0.3))) / 2
            latency[0], usd[0], energy[0] = local_s, LOCAL_USD, local_s * self.device_w
            cloud_noise = rng.gauss(0.0, 0.3)  # one draw: the cloud answers the same prompt whatever is uploaded
            table = CLOUD_LATENCY_S.get(link, CLOUD_LATENCY_S["wifi"])
            for i, subset in enumerate(SUBSETS):
                k = len(subset)
                quality[1 + i] = min(2.0, max(0.0, mean[1 + i] + cloud_noise)) / 2
                latency[1 + i] = table[k] * rng.uniform(0.9, 1.1)
                usd[1 + i] = CLOUD_USD[k]
                energy[1 + i] = RADIO_W * latency[1 + i] * 0.3
            worst = np.array([table[len(s)] * 1.1 for s in SUBSETS])
            expected = np.stack([np.r_[local_s, worst], usd, np.r_[energy[0], RADIO_W * worst * 0.3]])
            inputs = ObsInputs(
                task=task,
                prompt_chars=rng.randint(20, 2000),
                slots=slots,
                battery=battery,
                on_ac=on_ac,
                power_w=self.device_w if not on_ac else None,
                online=online,
                link=link,
                upload_bps=upload_bps(link),
            )
            out.append(TurnOutcomes(inputs, mask, quality, latency, usd, energy, assoc, expected, mean / 2))
            battery = max(0.0, battery - (0.0 if on_ac else 0.01))
        return out

    @staticmethod
    def quality_mean(slots: Sequence[Slot], assoc: np.ndarray) -> np.ndarray:
        """Each action's mean answer quality on TMO's 0-2 scale, before the N(0, 0.3) noise and clipping."""
        needs_image = any(s.relevance > 0.7 for s in slots)
        mean = np.zeros(N_ACTIONS)
        mean[0] = 0.7 - (0.3 if needs_image else 0.0)
        for i, subset in enumerate(SUBSETS):
            withheld = needs_image and not any(slots[j].relevance > 0.7 for j in subset if j < len(slots))
            mean[1 + i] = 1.0 + assoc[1 + i] - (0.5 if withheld else 0.0)
        return mean


@dataclass
class TraceSource:
    """Dialogues of the replay trace: text only, labels as quality, the trace's latency, money, energy."""

    path: Path
    dialogues: list[list[dict[str, Any]]] = field(default_factory=list)
    local_bound: np.ndarray = field(default_factory=lambda: np.zeros(3))
    local: str = ""  # the trace's one local model, whatever the GGUF that answered was called

    def __post_init__(self) -> None:
        rows = read_rows(self.path, scored=True)
        self.local = local_model(rows, self.path)
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_id.setdefault(row["dialogue"], []).append(row)
        self.dialogues = list(by_id.values())
        local = [row["models"][self.local] for row in rows]
        self.local_bound = np.array([max(r[key] for r in local) for key in ("latency_s", "usd", "energy_j")])

    def episode(self, rng: random.Random) -> list[TurnOutcomes]:
        out = []
        # The network is drawn as the simulator's episodes start: a constant one told the policy which source
        # a turn came from, and it then judged every turn on another network by the simulator's lesson.
        link = rng.choice(Simulator.links)
        for row in rng.choice(self.dialogues):
            local, cloud = row["models"][self.local], row["models"][CLOUD]
            mask = action_mask([], cloud_allowed=True)
            quality = np.zeros(N_ACTIONS)
            latency = np.zeros(N_ACTIONS)
            usd = np.zeros(N_ACTIONS)
            energy = np.zeros(N_ACTIONS)
            quality[0], latency[0], usd[0], energy[0] = (
                local["quality"],
                local["latency_s"],
                local["usd"],
                local["energy_j"],
            )
            quality[1:], latency[1:], usd[1:], energy[1:] = (
                cloud["quality"],
                cloud["latency_s"],
                cloud["usd"],
                cloud["energy_j"],
            )
            # the task as the daemon observes the same prompt, not the category the trace states for its task
            task = task_of(row["prompt"])
            inputs = ObsInputs(task=task, prompt_chars=len(row["prompt"]), link=link, upload_bps=upload_bps(link))
            out.append(TurnOutcomes(inputs, mask, quality, latency, usd, energy, np.zeros(N_ACTIONS)))
        return out


@dataclass
class LogSource:
    """Sessions of this device's decision log. The action taken has its recorded outcome; the location not
    taken is estimated, as in TMO, by a distance-weighted k-nearest-neighbour average (k = 5) over
    labelled turns that did go there, by task and prompt length."""

    rows: list[LoggedTurn]
    k: int = 5
    sessions: list[list[LoggedTurn]] = field(default_factory=list)
    local_bound: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        by_session: dict[str, list[LoggedTurn]] = {}
        for row in self.rows:
            by_session.setdefault(row.session, []).append(row)
        self.sessions = [sorted(s, key=lambda r: r.turn) for s in by_session.values()]
        self.by_location = {loc: [r for r in self.rows if r.backend == loc] for loc in ("local", "cloud")}
        self._estimates: dict[tuple[str, int, str], tuple[float, float, float, float]] = {}  # _estimate's
        if not self.by_location["local"] or not self.by_location["cloud"]:
            counts = {loc: len(rows) for loc, rows in self.by_location.items()}
            raise ValueError(
                "too few labels to train on: the decision log needs labelled turns answered both locally and in "
                f"the cloud (it has {counts['local']} local and {counts['cloud']} cloud); label answers with "
                "`locod feedback ID good|bad`"
            )
        # estimates for local answers average local rows, so the dearest logged one bounds them all
        self.local_bound = np.array([_outcome(r)[1:] for r in self.by_location["local"]]).max(axis=0)

    def _estimate(self, row: LoggedTurn, location: str) -> tuple[float, float, float, float]:
        if row.backend == location:
            return _outcome(row)
        # The neighbours depend on the task and the prompt's length alone: found once for each, as each
        # search sorts every labelled turn (6 ms a turn on a year's 40,000 labels, an hour of training).
        key = (row.observed.task, row.observed.prompt_chars, location)
        if key not in self._estimates:
            self._estimates[key] = self._neighbours_average(row, location)
        return self._estimates[key]

    def _neighbours_average(self, row: LoggedTurn, location: str) -> tuple[float, float, float, float]:
        def distance(other: LoggedTurn) -> float:
            a, b = other.observed, row.observed
            return float(a.task != b.task) + abs(math.log1p(a.prompt_chars) - math.log1p(b.prompt_chars))

        near = sorted(self.by_location[location], key=distance)[: self.k]
        weights = [1.0 / (1e-3 + distance(o)) for o in near]
        values = np.array([_outcome(o) for o in near])
        return tuple(float(v) for v in np.average(values, axis=0, weights=weights))  # type: ignore[return-value]

    def episode(self, rng: random.Random) -> list[TurnOutcomes]:
        out = []
        for row in rng.choice(self.sessions):
            slots = list(row.observed.slots)[:K]
            mask = action_mask(slots, cloud_allowed=True)
            local, cloud = self._estimate(row, "local"), self._estimate(row, "cloud")
            arrays = [np.array([local[i]] + [cloud[i]] * (N_ACTIONS - 1)) for i in range(4)]
            inputs = dataclasses.replace(row.observed, slots=slots)
            quality, latency, usd, energy = arrays
            out.append(TurnOutcomes(inputs, mask, quality, latency, usd, energy, association(slots)))
        return out


def _outcome(row: LoggedTurn) -> tuple[float, float, float, float]:
    """(quality, latency s, USD, energy J) of a logged turn."""
    return (float(row.satisfied), row.latency_total_ms / 1000, row.cost_usd, row.energy_j)


@dataclass
class Budgets:
    """What any WINDOW consecutive turns may spend."""

    latency_s: float
    usd: float
    energy_j: float

    def array(self) -> np.ndarray:
        return np.array([self.latency_s, self.usd, self.energy_j])


def sample_budgets(
    turns: list[TurnOutcomes], local_bound: np.ndarray, rng: random.Random, span: tuple[float, float] | None = None
) -> Budgets:
    """Each budget between its floor, WINDOW local answers at their dearest (so local answers always fit),
    and WINDOW of the episode's dearest action. Where in between: normal around the middle, uniform, or
    near either end (TMO's extreme-aware mix), drawn per resource; ``span`` fixes the range of that
    fraction instead (for evaluation: tight budgets near the floor, loose ones near the top)."""
    floor = WINDOW * local_bound
    dearest = np.max([turn.expected_spend()[:, turn.mask > 0].max(axis=1) for turn in turns], axis=0)
    top = np.maximum(floor, WINDOW * dearest)
    fractions = []
    for _ in range(3):
        if span is not None:
            fraction = rng.uniform(*span)
        else:
            mode = rng.random()
            if mode < 0.5:
                fraction = rng.gauss(0.5, 1 / 6)
            elif mode < 0.8:
                fraction = rng.random()
            else:  # near an extreme: within about a tenth of the floor or of the top
                near = rng.expovariate(10.0)
                fraction = near if rng.random() < 0.5 else 1.0 - near
        fractions.append(min(1.0, max(0.0, fraction)))
    latency, usd, energy = np.maximum((floor + np.array(fractions) * (top - floor)) * (1 + 1e-9), 1e-12)
    return Budgets(float(latency), float(usd), float(energy))


class OffloadEnv(gym.Env):
    """Gymnasium environment over a mix of turn sources; ``info["action_mask"]`` holds the mask."""

    metadata = {"render_modes": []}  # noqa: RUF012  (gymnasium declares it this way)

    def __init__(
        self,
        sources: Sequence[tuple[TurnSource, float]],
        weights: Weights | None = None,
        seed: int | None = None,
        budget_span: tuple[float, float] | None = None,
        shield: bool = True,
        load_p: float = 0.0,
    ) -> None:
        self.sources = list(sources)
        self.weights = weights or Weights()
        self.rng = random.Random(seed)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self.turns: list[TurnOutcomes] = []
        self.index = 0
        self.budgets = Budgets(1.0, 1.0, 1.0)
        self.local_bound = np.zeros(3)
        self.recent: list[np.ndarray] = []  # the last WINDOW - 1 turns' spend, oldest first
        self.history: list[PastTurn] = []
        self.violations = 0
        self.budget_span = budget_span
        self.shield = shield  # off: only the turn's own mask (to measure what the shield prevents)
        self.load_p = load_p  # the share of episodes whose local queue is under load
        self.queue = LocalQueue()
        self.ahead = 0.0  # turns ahead of this turn in the local queue

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self.rng = random.Random(seed)
        source = self.rng.choices([s for s, _ in self.sources], weights=[w for _, w in self.sources])[0]
        self.turns = source.episode(self.rng)
        self.local_bound = source.local_bound
        self.budgets = sample_budgets(self.turns, self.local_bound, self.rng, self.budget_span)
        if options and "budgets" in options:
            self.budgets = options["budgets"]
        loaded = self.load_p > 0 and self.rng.random() < self.load_p  # no draw without load: seeds stay comparable
        self.queue = LocalQueue.under_load(self.rng, len(self.turns)) if loaded else LocalQueue()
        self.ahead = self.queue.ahead
        self.index, self.recent, self.history, self.violations = 0, [], [], 0
        self.mask = self.shielded(self.turns[0])
        return self._obs(), {"action_mask": self.mask.copy()}

    def shielded(self, turn: TurnOutcomes, recent: list[np.ndarray] | None = None) -> np.ndarray:
        """The turn's mask less every action after which the window could not take local answers on the
        turns to come: for j = 0 .. WINDOW-1, the last WINDOW-1-j turns, this action and j local answers
        at their dearest must fit. If nothing does (budgets below the floor), the action overrunning least
        stays: something must answer. ``recent`` stands for the window's past spend (a planner's what-if)."""
        if not self.shield:
            return turn.mask
        if recent is None:
            recent = self.recent
        budgets = self.budgets.array()[:, None]
        expected = turn.expected_spend()
        fits = turn.mask > 0
        for j in range(WINDOW):
            past = sum(recent[max(0, len(recent) - (WINDOW - 1 - j)) :], np.zeros(3))
            fits = fits & np.all((past + j * self.local_bound)[:, None] + expected <= budgets, axis=0)
        if fits.any():
            return fits.astype(np.float32)
        after = (sum(recent, np.zeros(3))[:, None] + expected) / budgets
        least = np.where(turn.mask > 0, after.max(axis=0), np.inf)
        only = np.zeros(N_ACTIONS, dtype=np.float32)
        only[int(np.argmin(least))] = 1.0
        return only

    def remaining(self) -> tuple[float, float, float]:
        """The fraction of each budget the window leaves this turn (what the last WINDOW-1 turns did not)."""
        left = 1 - sum(self.recent, np.zeros(3)) / self.budgets.array()
        return tuple(float(v) for v in np.maximum(left, 0.0))  # type: ignore[return-value]

    def _obs(self) -> np.ndarray:
        turn = self.turns[self.index]
        inputs = ObsInputs(
            **{
                **vars(turn.inputs),
                "history": list(self.history),
                "budgets": self.remaining(),
                "local_wait_s": self.wait_s(),
            }
        )
        return observe(inputs)

    def wait_s(self) -> float:
        """This turn's expected wait for the local model."""
        return self.queue.wait_s(self.ahead)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        turn = self.turns[self.index]
        if self.mask[action] == 0:
            raise ValueError(f"action {action} is masked on this turn")
        allowed = turn.mask > 0  # normalisation spans everything the turn allows, the shield aside
        w = self.weights
        wait = self.wait_s()
        latency = waited(turn.latency, wait)
        reward = (
            w.quality * turn.quality[action]
            + w.association * turn.association[action]
            - w.latency * normalised(latency, allowed)[action]
            - w.cost * normalised(turn.usd, allowed)[action]
        )
        spend = turn.spend(action)
        over = bool(np.any(sum(self.recent, np.zeros(3)) + spend > self.budgets.array()))
        self.recent = window_after(self.recent, spend)
        if over:  # RC-RL: an overrunning step earns nothing, and a penalty so the lesson is learnt
            reward = -OVERRUN_PENALTY
            self.violations += 1
        sent = tuple(k in SUBSETS[action - 1] for k in range(K)) if action else (False,) * K
        self.history.append(PastTurn("local" if action == 0 else "cloud", sent, turn.inputs.task))
        info: dict[str, Any] = {
            "quality": float(turn.quality[action]),
            "latency": float(latency[action]),
            "wait": wait if action == 0 else 0.0,
            "usd": float(turn.usd[action]),
            "energy": float(turn.energy[action]),
            "violation": over,
            "uploads": len(SUBSETS[action - 1]) if action else 0,
        }
        self.ahead = self.queue.after(self.ahead, self.index, action == 0)
        self.index += 1
        done = self.index >= len(self.turns)
        obs = np.zeros(OBS_DIM, dtype=np.float32) if done else self._obs()
        if not done:
            self.mask = self.shielded(self.turns[self.index])
        info["action_mask"] = np.ones(N_ACTIONS, dtype=np.float32) if done else self.mask.copy()
        return obs, float(reward), done, False, info


def default_sources(trace: Path | None) -> list[tuple[TurnSource, float]]:
    sources: list[tuple[TurnSource, float]] = [(Simulator(), 0.7 if trace else 1.0)]
    if trace is not None and trace.exists():
        sources.append((TraceSource(trace), 0.3))
    return sources
