"""The TMO policy's observation and action layout, version 2: one definition for training and the daemon.

Actions (TMO's 1 + 2^K layout, per location): action 0 answers locally; action 1 + i answers in the cloud
uploading the i-th subset of the K attachment slots, subsets ordered by size, then lexicographically
(subset 0 = text only). Attachments fill the slots ranked by relevance.

Observation, ``OBS_DIM`` floats, each in [0, 1] unless noted (names in ``FEATURE_NAMES``):
- history, the last Z turns, oldest first, each: answered locally, answered in the cloud, the K slots
  sent, task one-hot (all zero for a turn that did not happen);
- this turn: task one-hot, log prompt length / 10, attachment count / K, and per slot: present,
  relevance, is an image;
- device and network: battery fraction (1 when unknown), on AC, power / 50 W, CPU load, online, link
  one-hot (ethernet, wifi, cellular, none), log10(upload bytes/s) / 8, RTT / 1 s (capped at 1);
- the local queue (version 2): the expected wait for the local model, turns ahead x recent turn time
  (policy/load.py), as log1p(seconds) / log1p(60), capped at 1;
- remaining budgets: latency, money, energy, as the fraction of each budget left to this turn (in
  training, what the last turns of the budget window left; in the daemon, the day's money cap and the
  battery);
- MESS+: Q / q_cap, predicted satisfaction of the local and of the cloud model.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from locod.policy.tasks import TASKS

LAYOUT_VERSION = 2
ADDED_IN = {2: ("local_wait",)}  # features each layout version added: a policy of an older one runs without
WAIT_CAP_S = 60.0  # the local wait feature is 1 from a minute's wait on
K = 3  # attachment slots
Z = 3  # dialogue turns of history
LINKS = ("ethernet", "wifi", "cellular", "none")

SUBSETS: tuple[tuple[int, ...], ...] = tuple(
    subset for size in range(K + 1) for subset in itertools.combinations(range(K), size)
)
N_ACTIONS = 1 + len(SUBSETS)


def action_name(action: int) -> str:
    if action == 0:
        return "local"
    subset = SUBSETS[action - 1]
    return "cloud+" + ",".join(str(i) for i in subset) if subset else "cloud"


ACTION_NAMES = tuple(action_name(a) for a in range(N_ACTIONS))


def _names() -> list[str]:
    names = []
    for z in range(Z):
        names += [
            f"h{z}_local",
            f"h{z}_cloud",
            *(f"h{z}_sent{k}" for k in range(K)),
            *(f"h{z}_task_{t}" for t in TASKS),
        ]
    names += [f"task_{t}" for t in TASKS] + ["log_prompt_chars", "attachments"]
    for k in range(K):
        names += [f"slot{k}_present", f"slot{k}_relevance", f"slot{k}_image"]
    names += ["battery", "on_ac", "power", "cpu", "online", *(f"link_{x}" for x in LINKS), "log_upload_bps", "rtt"]
    names += ["local_wait"]
    names += ["budget_latency", "budget_money", "budget_energy", "q", "s_local", "s_cloud"]
    return names


FEATURE_NAMES = tuple(_names())
OBS_DIM = len(FEATURE_NAMES)


def layout_features(version: int) -> tuple[str, ...]:
    """The features of an older layout ``version``, in order: this layout's, less those added since."""
    added = {name for v, names in ADDED_IN.items() if v > version for name in names}
    return tuple(name for name in FEATURE_NAMES if name not in added)


@dataclass(frozen=True)
class Slot:
    relevance: float
    image: bool
    private: bool = False


@dataclass(frozen=True)
class PastTurn:
    location: str
    sent: tuple[bool, ...]
    task: str


@dataclass(frozen=True)
class ObsInputs:
    task: str
    prompt_chars: int
    slots: Sequence[Slot] = ()
    history: Sequence[PastTurn] = ()
    battery: float | None = None
    on_ac: bool | None = None
    power_w: float | None = None
    cpu_pct: float | None = None
    online: bool | None = True
    link: str = "unknown"
    upload_bps: float = 2e6
    rtt_ms: float | None = None
    local_wait_s: float = 0.0
    budgets: tuple[float, float, float] = (1.0, 1.0, 1.0)
    q_norm: float = 0.0
    s_local: float = 0.5
    s_cloud: float = 0.85


_LOG_WAIT_CAP = math.log1p(WAIT_CAP_S)


def _onehot(value: str, options: Sequence[str]) -> list[float]:
    return [float(value == o) for o in options]


def _clip(x: float | None, default: float = 0.0) -> float:
    if x is None or not math.isfinite(x):
        return default
    return min(1.0, max(0.0, x))


@functools.lru_cache(maxsize=1024)
def _past(turn: PastTurn | None) -> tuple[float, ...]:
    """One history entry's features; cached, as a session's trail repeats in every later turn's history."""
    if turn is None:
        return (0.0,) * (2 + K + len(TASKS))
    sent = list(turn.sent[:K]) + [False] * (K - len(turn.sent[:K]))
    return (
        float(turn.location == "local"),
        float(turn.location == "cloud"),
        *map(float, sent),
        *_onehot(turn.task, TASKS),
    )


def observe(inputs: ObsInputs) -> np.ndarray:
    """The observation vector. Values are gathered raw and clipped to [0, 1] by numpy at the end (this runs
    on every turn): NaN becomes 0; only the battery's unknown/garbage default is 1."""
    obs: list[float] = []
    past = list(inputs.history)[-Z:]
    for turn in [None] * (Z - len(past)) + past:
        obs += _past(turn)
    obs += _onehot(inputs.task, TASKS)
    obs += [math.log1p(max(0, inputs.prompt_chars)) / 10, len(inputs.slots) / K]
    slots = list(inputs.slots)[:K]
    for k in range(K):
        if k < len(slots):
            obs += [1.0, slots[k].relevance, float(slots[k].image)]
        else:
            obs += [0.0, 0.0, 0.0]
    obs += [
        _clip(inputs.battery, 1.0),
        float(inputs.on_ac is not False),
        (inputs.power_w or 0) / 50,
        (inputs.cpu_pct or 0) / 100,
        float(inputs.online is not False),
        *_onehot(inputs.link, LINKS),
        math.log10(max(inputs.upload_bps, 1.0)) / 8,
        (inputs.rtt_ms or 0) / 1000,
        math.log1p(max(0.0, inputs.local_wait_s)) / _LOG_WAIT_CAP,
        *inputs.budgets,
        inputs.q_norm,
        inputs.s_local,
        inputs.s_cloud,
    ]
    out = np.array(obs, dtype=np.float32)
    np.fmax(out, 0.0, out=out)  # fmax/fmin pass over NaN: NaN and -inf become 0, +inf 1
    return np.fmin(out, 1.0, out=out)


def action_mask(
    slots: Sequence[Slot], cloud_allowed: bool, vision: bool = True, local_allowed: bool = True
) -> np.ndarray:
    """Which actions may be taken: no empty, private or (for a text-only cloud model) image slot is sent."""
    allowed = [float(local_allowed)] + [0.0] * len(SUBSETS)
    if cloud_allowed:
        present = list(slots)[:K]
        unsendable = sum(
            1 << k for k in range(K) if k >= len(present) or present[k].private or (present[k].image and not vision)
        )
        for i, bits in enumerate(_SUBSET_BITS):
            allowed[1 + i] = float(not bits & unsendable)
    if not any(allowed):
        allowed[0] = 1.0  # something must answer: the local model
    return np.array(allowed, dtype=np.float32)


_SUBSET_BITS = tuple(sum(1 << k for k in subset) for subset in SUBSETS)
