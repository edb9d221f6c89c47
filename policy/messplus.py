"""MESS+ (Woisetschläger et al., NeurIPS 2025): keep a satisfaction SLA at minimum cost, learning online.

Per turn, for every candidate model m, a predictor gives s_hat_m (probability the answer satisfies) and a
cost model gives cost_m in [0, 1]. With the feed-forward price mu (policy/price.py: the price of
satisfaction at which the recent turns' predictions reach alpha) and the signed queue Z the rule picks

    m* = argmin_m  V * (cost_m + extra_m) + (Z' + V * mu) * (alpha - s_hat_m)    (extra: the TMO policy's term)
    Z' = CATCH_UP * Z behind the SLA (Z > 0), Z ahead of it

and both queues move by s, the label when one exists and the prediction until it arrives (corrected by the
difference when it does: labels may be late or never come): Z <- clip(Z + alpha - s, -q_cap, q_cap), and
the paper's Q <- clip(Q + alpha - s, 0, q_cap), which is reported and observed by the TMO policy. mu already
prices the SLA, so Z only corrects the predictor's bias, in both directions: a surplus banked below 0 lowers
the price, where Q, clipped at 0, could only ever raise it; a deficit raises it four times as fast, so that a
late run of bad answers does not leave the SLA missed (measured: docs/routing.md).
With probability min(1, c / t^(1/4)) a turn explores a random candidate so that every model keeps getting
labels. The predictor is one logistic head per model over hashed word n-grams plus a few dense features,
trained by SGD on each label; a per-model prior is its starting bias. Everything persists atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import operator
import os
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from locod.daemon.regular_file import read_regular, written_whole
from locod.daemon.textwords import split_letters
from locod.policy.confidence import WEIGHT_LIMIT, ConfidenceHead, bounded, loadable
from locod.policy.price import SlaPrice
from locod.policy.tasks import TASKS
from locod.policy.warmstart import Prior

log = logging.getLogger(__name__)

STATE_VERSION = 1
# ~33 kB per model, ~100 bytes per pending label (its model's name as text) and 8 per settled id: a bigger file
# is not one save wrote
MAX_STATE_BYTES = 64 << 20
INFEASIBLE_AFTER = 20  # turns settled before an SLA out of reach is reported
KEPT_TURNS = 10_000  # settled turns whose prediction (pending) and whose id (settled_ids) the state keeps
SETTLED_SLACK = 1_000  # settled ids kept beyond KEPT_TURNS before the lowest are let go together
CATCH_UP = 4.0  # how much more a deficit of Z moves the price than a surplus does (current_price)
HASH_DIM = 4096
DENSE = (
    "bias",
    "log_chars",
    "n_attachments",
    "withheld",
    "max_relevance",
    "has_image",
    "position",
    "prev_cloud",
    *(f"task_{t}" for t in TASKS),
)
DIM = HASH_DIM + len(DENSE)


@dataclass(frozen=True)
class TurnFeatures:
    """What the predictor knows about one way of answering a turn: the prompt, and the attachments that
    answer would see (``withheld_relevance``: the best relevance among those it would not)."""

    prompt: str
    task: str
    n_attachments: int = 0
    max_relevance: float = 0.0
    has_image: bool = False
    position: int = 0
    prev_cloud: bool = False
    withheld_relevance: float = 0.0


def vectorize(f: TurnFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Sparse (indices, values): hashed unigrams and bigrams (L2-normalised), then the dense features."""
    indices, hashed_values = _hashed(f.prompt)
    return indices, np.concatenate((hashed_values, dense_features(f, len(f.prompt))))


def dense_features(f: TurnFeatures, prompt_chars: int) -> tuple[float, ...]:
    """The predictor's dense features, in DENSE's order."""
    return (
        1.0,
        math.log1p(prompt_chars) / 8.0,
        min(f.n_attachments, 8) / 8.0,
        min(1.0, max(0.0, _finite(f.withheld_relevance))),
        _finite(f.max_relevance),
        float(f.has_image),
        min(f.position, 20) / 20.0,
        float(f.prev_cloud),
        *_TASK_ONEHOT.get(f.task, _NO_TASK),
    )


_TASK_ONEHOT = {t: tuple(float(t == u) for u in TASKS) for t in TASKS}
_NO_TASK = (0.0,) * len(TASKS)


DENSE_INDICES = np.arange(HASH_DIM, DIM, dtype=np.int64)


@functools.lru_cache(maxsize=256)
def _hashed(prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """The prompt's hashed n-grams (indices already followed by the dense features'); cached because every
    candidate action of a turn shares them. Its words are split at whitespace and at each letter of Chinese,
    Japanese or Thai (``split_letters``): split at whitespace alone, such a sentence was one word, unique to
    its prompt, and labels taught nothing the next prompt of its kind shared."""
    words = split_letters(prompt.lower())[:256]
    counts: dict[int, float] = {}
    for gram in words + [a + " " + b for a, b in zip(words, words[1:])]:
        index = zlib.crc32(gram.encode()) % HASH_DIM
        counts[index] = counts.get(index, 0.0) + 1.0
    norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
    indices = np.concatenate([np.fromiter(counts.keys(), dtype=np.int64, count=len(counts)), DENSE_INDICES])
    values = np.fromiter((v / norm for v in counts.values()), dtype=np.float64, count=len(counts))
    indices.flags.writeable = values.flags.writeable = False
    return indices, values


@functools.lru_cache(maxsize=256)
def hashed_record(prompt: str) -> dict[int, float]:
    """The prompt's hashed n-grams as a decision record keeps them (rounded); cached like ``_hashed``, and
    shared: callers must not change it."""
    indices, values = _hashed(prompt)
    return {i: round(v, 5) for i, v in zip(indices[: len(values)].tolist(), values.tolist())}


@dataclass(frozen=True)
class RecordedFeatures:
    """The features a decision was taken on, as its record keeps them (the prompt as its hashed n-grams,
    since the prompt itself is logged only when configured): a label that comes later trains on exactly
    what was decided on."""

    turn: TurnFeatures  # with the prompt left out
    hashed: dict[int, float]
    prompt_chars: int = 0  # 0 in records older than this field

    @classmethod
    def of(cls, features: TurnFeatures) -> RecordedFeatures:
        return cls(dataclasses.replace(features, prompt=""), hashed_record(features.prompt), len(features.prompt))

    def to_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in vars(self.turn).items() if k != "prompt"}
        return {**fields, "prompt_chars": self.prompt_chars, "hashed": self.hashed}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RecordedFeatures | None:
        """None for a record without features (a forced turn)."""
        if not data or "hashed" not in data:
            return None
        names = [k for k in TurnFeatures.__dataclass_fields__ if k != "prompt" and k in data]
        turn = TurnFeatures(prompt="", **{k: data[k] for k in names})
        hashed = {int(i): float(v) for i, v in data["hashed"].items()}
        return cls(turn, hashed, int(data.get("prompt_chars", 0)))

    def vector(self) -> tuple[np.ndarray, np.ndarray]:
        """The sparse vector ``vectorize`` gave the original prompt."""
        dense_values = dense_features(self.turn, self.prompt_chars)
        indices = np.fromiter([*self.hashed, *DENSE_INDICES.tolist()], dtype=np.int64)
        values = np.fromiter([*self.hashed.values(), *dense_values], dtype=np.float64)
        return indices, values


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


@dataclass
class Choice:
    """A turn's choice: the model that answers, whether the turn explored, the predictions it was made on and
    the key of the action chosen (a model, or a model with an upload choice)."""

    model: str
    explored: bool
    s_hat: dict[str, float]
    key: str = ""
    price: float = 0.0  # what one unit of satisfaction was worth in cost on this turn (current_price)


@dataclass
class MessPlusState:
    q: float = 0.0  # the paper's queue Q, reported and observed by the TMO policy
    z: float = 0.0  # the signed queue the rule uses (Q without its floor at 0)
    t: int = 0  # turns chosen: exploration's clock
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)  # labels seen per model
    settled: int = 0  # answered turns
    satisfied_sum: float = 0.0  # sum of s over answered turns (labels where known, predictions otherwise)
    pending: dict[int, tuple[str, float]] = field(default_factory=dict)  # decision -> (model, s used)
    price: SlaPrice = field(default_factory=SlaPrice)  # recent turns' predictions, for the feed-forward price
    confidence: dict[str, ConfidenceHead] = field(default_factory=dict)  # per local model that has answered
    file_sizes: dict[str, int] = field(default_factory=dict)  # per local model: the GGUF its heads learned on
    # per local model that started over: the first decision its current GGUF answered (older ones' labels
    # were earned by the file before it, and train nothing)
    file_since: dict[str, int] = field(default_factory=dict)
    sla: float | None = None  # the target the queue was built up under
    # The last turns settled (decision ids): a start tells from them which turns the log has answered that
    # this state never settled (a kill between a turn's completion and the state's save).
    settled_ids: dict[int, None] = field(default_factory=dict)
    # Saved by a clean stop: the decision log's newest id then, every answered turn up to it settled here; a
    # start whose log has not grown since has nothing to settle again, one whose log has reads from after it
    # when no settled id is left. Also where ``follow_log`` dropped every id: the log's turns up to its newest
    # are none of this state's to settle. None in every other save.
    stopped_at: int | None = None
    # The identity of the decision log the ids above name turns of (DecisionLog.identity); None: not known yet.
    log_id: str | None = None


@dataclass(frozen=True)
class LogChange:
    """What ``MessPlus.follow_log`` found: another log (every decision id dropped), or the same one holding
    fewer decisions than ``known``, the newest id the state knew (those after its newest dropped)."""

    another: bool
    known: int


@dataclass(frozen=True)
class StateCopy:
    """The MESS+ state as a save writes it, copied apart from the writing (serialised, then two fsyncs): the
    learner copies under the lock every decision takes and writes after letting it go. The kept turns stay
    Python values until written: made arrays under the lock, they held it 0.4 ms at 3,000 kept turns."""

    path: Path
    arrays: dict[str, np.ndarray]
    pending: dict[int, tuple[str, float]]
    settled_ids: list[int]

    def write(self) -> None:
        arrays: dict[str, Any] = {  # numpy 2's stubs match ** to savez's allow_pickle (numpy 1.26 has none)
            **self.arrays,
            "pending_ids": np.array(list(self.pending), dtype=np.int64),
            "pending_models": np.array([m for m, _ in self.pending.values()], dtype=str),
            "pending_s": np.array([s for _, s in self.pending.values()], dtype=np.float64),
            "settled_ids": np.array(self.settled_ids, dtype=np.int64),
        }
        # a FIFO at messplus.tmp held the save, and every turn behind its lock: written_whole makes it anew
        with written_whole(self.path, self.path.with_suffix(".tmp")) as f:
            np.savez(f, **arrays)


class MessPlus:
    """The router's learned state and rule: a predictor per model, the queues, and the choice of each turn."""

    def __init__(
        self,
        models: dict[str, float],
        *,
        sla: float,
        v: float,
        explore_c: float,
        q_cap: float,
        path: Path | None = None,
        rng: random.Random | None = None,
        learning_rate: float = 0.5,
        state: MessPlusState | None = None,
    ) -> None:
        """``models`` maps each candidate's name to its prior probability of satisfying. ``state``: carry on
        from one in memory (a reload) rather than read ``path``, which holds only what the last save could
        write (a full disk may have refused every save since)."""
        self.priors = dict(models)
        self.sla, self.v, self.explore_c, self.q_cap = sla, v, explore_c, q_cap
        self.path = path
        self.rng = rng or random.Random()
        self.learning_rate = learning_rate
        if state is None:
            state = self._load() if path is not None else MessPlusState()
        self.state = state
        self._start_queue_over_if_retargeted()
        for name, prior in self.priors.items():
            self.state.weights.setdefault(name, _prior_weights(prior))
        self._forget_unlearned_models()
        self.max_s_hat_avg = 1.0  # EWMA of the best predicted satisfaction: detects an infeasible SLA

    def _forget_unlearned_models(self) -> None:
        """Drop the predictors of models no longer configured that never learned from a label: they hold
        their prior only, which a model that comes back starts from again. Kept, each reload that renamed
        the models added theirs to the state saved after every turn, without bound."""
        for name in [n for n in self.state.weights if n not in self.priors and not self.state.labels.get(n)]:
            del self.state.weights[name]
            if name in self.state.confidence and not self.state.confidence[name].seen:
                del self.state.confidence[name]
            self.state.file_sizes.pop(name, None)
            self.state.file_since.pop(name, None)

    def _start_queue_over_if_retargeted(self) -> None:
        """A new target (a reload or restart with another ``routing.sla``) starts the queue over: Q holds the
        shortfall against the old target, which after a lowered one sent turns on to the cloud although the
        satisfaction reached was above the new target, and after a raised one understated what it asks."""
        previous, self.state.sla = self.state.sla, self.sla
        if previous is not None and previous != self.sla and (self.state.q or self.state.z):
            log.info(
                "MESS+ target is now %.3g (was %.3g): its queue (Q %.2f) starts over", self.sla, previous, self.state.q
            )
            self.state.q = self.state.z = 0.0

    # -- prediction and the rule ---------------------------------------------------------------------

    def satisfaction(self, x: tuple[np.ndarray, np.ndarray], model: str) -> float:
        """s_hat: the predicted probability that ``model`` satisfies the turn described by ``x``."""
        indices, values = x
        return _sigmoid(float(self.state.weights[model][indices] @ values))

    def satisfaction_of_turn(self, features: Sequence[TurnFeatures], models: Sequence[str]) -> list[float]:
        """s_hat of each way of answering one turn (``features[i]`` answered by ``models[i]``), all at once:
        they share the prompt, so its hashed part is dotted once per model and only the dense features
        differ. Equal to ``satisfaction(vectorize(f), m)`` pair by pair; this runs on every turn, and plain
        Python beats numpy's per-call overhead on 14 dense features."""
        indices, values = _hashed(features[0].prompt)
        hashed = indices[: len(values)]
        prompt_part, dense_weights = {}, {}
        for model in set(models):
            w = self.state.weights[model]
            prompt_part[model] = float(w[hashed] @ values)
            dense_weights[model] = w[HASH_DIM:].tolist()
        return [
            _sigmoid(prompt_part[m] + sum(map(operator.mul, dense_features(f, len(f.prompt)), dense_weights[m])))
            for f, m in zip(features, models, strict=True)
        ]

    def choose(
        self,
        costs: dict[str, float],
        *,
        s_hat: dict[str, float] | None = None,
        xs: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        extra: dict[str, float] | None = None,
        model_of: dict[str, str] | None = None,
    ) -> Choice:
        """Pick among ``costs``'s keys (already masked): models, or actions such as a model with an upload
        choice, each answered by ``model_of[key]``, with ``s_hat`` per key, or ``xs`` per key to predict
        it from; ``extra`` adds a per-key term in cost units (the TMO policy's), weighed by V as the cost is.
        s_hat comes back in the Choice."""
        keys = list(costs)
        model_of = model_of or {k: k for k in keys}
        if s_hat is None:
            if xs is None:
                raise TypeError("choose() needs s_hat or xs")
            s_hat = {k: self.satisfaction(xs[k], model_of[k]) for k in keys}
        self.state.t += 1
        self.max_s_hat_avg = 0.95 * self.max_s_hat_avg + 0.05 * max(s_hat.values())
        self.state.price.add([(costs[k], s_hat[k]) for k in keys])
        price = self.current_price
        q = self.v * price
        objective = {k: self.v * (costs[k] + (extra or {}).get(k, 0.0)) + q * (self.sla - s_hat[k]) for k in keys}
        explore = len(keys) > 1 and self.rng.random() < self.explore_probability
        key = self.rng.choice(keys) if explore else min(keys, key=objective.__getitem__)
        return Choice(model_of[key], explore, s_hat, key, price)

    @property
    def explore_probability(self) -> float:
        return min(1.0, self.explore_c / max(1, self.state.t) ** 0.25)

    def settle(self, decision: int, model: str, s_hat: float) -> None:
        """After a turn is answered: move the queue by the prediction until a label arrives."""
        self._shift_queue(self.sla - s_hat)
        self.state.settled += 1
        self.state.satisfied_sum += s_hat
        self.state.pending[decision] = (model, s_hat)
        if len(self.state.pending) > KEPT_TURNS:  # labels that never came: their predictions stand
            del self.state.pending[next(iter(self.state.pending))]
        self.state.settled_ids[decision] = None
        if len(self.state.settled_ids) > KEPT_TURNS + SETTLED_SLACK:
            # The lowest go, so every id kept is above every one let go; a thousand at a time: finding the
            # lowest of 10,000 took 0.1 ms of every turn's settling, under the lock decisions wait on.
            for old in sorted(self.state.settled_ids)[:SETTLED_SLACK]:
                del self.state.settled_ids[old]

    def label(self, decision: int, model: str, x: tuple[np.ndarray, np.ndarray], satisfied: bool) -> bool:
        """A label for a settled turn: correct the queue, then train that model's head; False, training
        nothing, for a turn answered by the file ``model`` named before its current one."""
        y = 1.0 if satisfied else 0.0
        pending = self.state.pending.pop(decision, None)
        if pending is not None:
            self._shift_queue(pending[1] - y)
            self.state.satisfied_sum += y - pending[1]
        if decision < self.state.file_since.get(model, 0):
            return False
        self.train(model, x, y)
        return True

    def train(self, model: str, x: tuple[np.ndarray, np.ndarray], y: float) -> None:
        """One SGD step of ``model``'s head towards the label ``y``, smaller as it has seen more labels."""
        if model not in self.state.weights:
            return
        indices, values = x
        w = self.state.weights[model]
        p = _sigmoid(float(w[indices] @ values))
        seen = self.state.labels.get(model, 0)
        rate = self.learning_rate / math.sqrt(1.0 + seen / 50.0)
        w[indices] -= rate * ((p - y) * values + 1e-4 * w[indices])
        self.state.labels[model] = seen + 1

    def start_over_if_replaced(self, model: str, file_size: int, first_decision: int = 0) -> int | None:
        """Forget what ``model``'s heads learned when its name now stands for another GGUF (a file of another
        size: another model or quantisation, pulled or configured under the same name), whose competence and
        log-probabilities are not the old one's, and learn from the labels of ``first_decision`` on only (0:
        of every decision, where none is logged); returns the old file's size when it did."""
        learned_on = self.state.file_sizes.get(model)
        self.state.file_sizes[model] = file_size
        if learned_on is None or learned_on == file_size:
            return None
        self.state.file_since[model] = first_decision
        self.state.weights[model] = _prior_weights(self.priors.get(model, 0.5))
        self.state.labels.pop(model, None)
        self.state.confidence.pop(model, None)
        return learned_on

    def follow_log(self, log_id: str | None, newest: int) -> LogChange | None:
        """Keep the decision ids the state holds only where they name the decision log's turns (``log_id``,
        its ``newest`` id), and say what was dropped. Another log (its identity another: a new file, another
        device's) numbers other turns: every id is dropped, or its turns would be settled and its labels
        learned as this state's. The same log with fewer decisions than the state knows (restored from a
        backup, emptied) gives the ids after its newest again, to new turns: those are dropped (a new turn
        answered but not settled was taken for a settled one, a label refused as an older file's or moving
        the queue by another turn's prediction); the ids up to it still name the turns they did."""
        known = max([*self.state.settled_ids, *self.state.pending, self.state.stopped_at or 0], default=0)
        another = self.state.log_id is not None and log_id is not None and self.state.log_id != log_id
        self.state.log_id = log_id or self.state.log_id
        if not another and known <= newest:
            return None
        kept = 0 if another else newest
        self.state.settled_ids = {i: None for i in self.state.settled_ids if i <= kept}
        self.state.pending = {i: p for i, p in self.state.pending.items() if i <= kept}
        self.state.file_since = {m: min(i, kept + 1) for m, i in self.state.file_since.items() if kept}
        # with no id left to tell missed turns by, the log's turns up to its newest are none of this state's:
        # a turn after them answered and not settled (a kill) is then still found at the next start
        self.state.stopped_at = None if self.state.settled_ids else newest
        return LogChange(another, known)

    def warm_start(self, model: str, prior: Prior | None) -> bool:
        """Start ``model``'s heads from a shipped prior (warmstart.load_prior) unless it has learned already."""
        if prior is None or self.state.labels.get(model, 0) or prior.weights.shape != (DIM,):
            return False
        self.state.weights[model] = prior.weights.astype(np.float64).copy()
        self.state.confidence[model] = ConfidenceHead(prior.confidence)
        return True

    def confidence_head(self, model: str) -> ConfidenceHead:
        """s_hat of a local model that has answered (its prompt-only s_hat corrected by the answer's
        confidence), trained on every label of an answer whose confidence is known (kept, escalated, shadow)."""
        return self.state.confidence.setdefault(model, ConfidenceHead())

    @property
    def current_price(self) -> float:
        """What one unit of satisfaction is worth in cost now: the feed-forward price plus Z / V, never below
        0 (a banked surplus may make satisfaction free, never unwanted). A deficit (Z > 0) counts CATCH_UP
        times: the SLA is a promise about the turns so far, so a run of bad answers must be made up within
        dozens of turns, not hundreds, while a surplus is only money and is spent slowly."""
        z = self.state.z * (CATCH_UP if self.state.z > 0 else 1.0)
        return max(0.0, (z / self.v if self.v else 0.0) + self.state.price.price(self.sla))

    def _shift_queue(self, step: float) -> None:
        self.state.q = min(self.q_cap, max(0.0, self.state.q + step))
        self.state.z = min(self.q_cap, max(-self.q_cap, self.state.z + step))

    # -- reporting -----------------------------------------------------------------------------------

    @property
    def attained(self) -> float | None:
        return None if self.state.settled == 0 else self.state.satisfied_sum / self.state.settled

    @property
    def infeasible(self) -> bool:
        """Behind the SLA after the first turns while even the best action on offer is predicted below it:
        no mix of those actions reaches it (with no cloud model, a small local model rarely can). Said
        from the twentieth turn on, not only once Q has grown to its cap."""
        return self.state.settled >= INFEASIBLE_AFTER and self.state.q > 0 and self.max_s_hat_avg < self.sla

    # -- persistence ---------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the state now: for a MessPlus no other thread changes (the learner copies it under its lock
        and writes the copy after letting the lock go)."""
        copy = self.snapshot()
        if copy is not None:
            copy.write()

    def snapshot(self) -> StateCopy | None:
        """The state as a save writes it, copied (None: kept in memory only): cheap next to the writing."""
        if self.path is None:
            return None
        names = sorted(self.state.weights)
        price_bases, price_steps = self.state.price.arrays()
        optional = {"stopped_at": self.state.stopped_at, "log_id": self.state.log_id}  # written where known
        known: dict[str, Any] = {key: np.array(value) for key, value in optional.items() if value is not None}
        conf_names = sorted(self.state.confidence)
        arrays = dict(
            version=np.array(STATE_VERSION),
            dim=np.array(DIM),
            q=np.array(self.state.q),
            z=np.array(self.state.z),
            t=np.array(self.state.t),
            settled=np.array(self.state.settled),
            satisfied_sum=np.array(self.state.satisfied_sum),
            names=np.array(names),
            weights=np.stack([self.state.weights[n] for n in names]),
            labels=np.array([self.state.labels.get(n, 0) for n in names]),
            price_bases=price_bases,
            price_steps=price_steps,
            conf_names=np.array(conf_names, dtype=str),
            conf_weights=np.array([self.state.confidence[n].weights for n in conf_names]),
            conf_seen=np.array([self.state.confidence[n].seen for n in conf_names]),
            sla=np.array(self.sla),
            file_names=np.array(list(self.state.file_sizes), dtype=str),
            file_sizes=np.array(list(self.state.file_sizes.values()), dtype=np.int64),
            file_since=np.array([self.state.file_since.get(n, 0) for n in self.state.file_sizes], dtype=np.int64),
            **known,
        )
        return StateCopy(self.path, arrays, dict(self.state.pending), list(self.state.settled_ids))

    def _load(self) -> MessPlusState:
        assert self.path is not None
        if not self.path.exists():
            return MessPlusState()
        try:  # read as a regular file only: np.load would open a FIFO there and wait for a writer for good
            raw = read_regular(self.path, MAX_STATE_BYTES)
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                if int(data["version"]) != STATE_VERSION or int(data["dim"]) != DIM:
                    raise ValueError(
                        f"version {int(data['version'])}, dim {int(data['dim'])}; this locod reads version "
                        f"{STATE_VERSION}, dim {DIM}: rename it back when running the locod that wrote it"
                    )
                _check_shapes(data)
                names = [str(n) for n in data["names"]]
                weights = {n: data["weights"][i].astype(np.float64) for i, n in enumerate(names)}
                if any(not np.all(np.isfinite(w)) for w in weights.values()):
                    raise ValueError("non-finite weights")
                state = MessPlusState(
                    q=float(data["q"]),
                    t=int(data["t"]),
                    settled=int(data["settled"]),
                    weights=weights,
                    labels={n: int(c) for n, c in zip(names, data["labels"]) if c},
                    satisfied_sum=float(data["satisfied_sum"]),
                    pending={
                        int(i): (str(m), float(s))
                        for i, m, s in zip(data["pending_ids"], data["pending_models"], data["pending_s"])
                    },
                )
                _read_added_arrays(data, state)
                _check_values(state)
        except Exception as exc:  # corrupt, truncated, foreign: never let it poison routing
            aside = _aside(self.path)
            os.replace(self.path, aside)
            log.error(
                "MESS+ state %s is unusable (%s); kept aside as %s, starting from the prior", self.path, exc, aside
            )
            return MessPlusState()
        if not (math.isfinite(state.q) and state.q >= 0):
            state.q = 0.0
        if not math.isfinite(state.z):
            state.z = 0.0
        return state


def _aside(path: Path) -> Path:
    """A name to keep a damaged state file under that no file has yet: named by the second alone, one set aside
    in a second an earlier one had replaced it, which a clock set back repeats (a Jetson without an RTC starts
    at the same second of 1970 at every boot), and the earlier damage was lost unseen."""
    stamp = aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
    n = 0
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = stamp.with_name(f"{stamp.name}-{n}")
    return aside


def _read_added_arrays(data: np.lib.npyio.NpzFile, state: MessPlusState) -> None:
    """Into ``state``, the arrays later versions of the file added, each absent from files written before it."""
    if "price_bases" in data:  # the feed-forward price, the signed queue and the confidence heads
        state.z = float(data["z"])
        state.price.restore(data["price_bases"], data["price_steps"])
        for name, w, seen in zip(data["conf_names"], data["conf_weights"], data["conf_seen"]):
            if not loadable(w):
                raise ValueError(f"confidence head of {name} has {w.shape} weights")
            state.confidence[str(name)] = ConfidenceHead(w)
            state.confidence[str(name)].seen = int(seen)
    if "sla" in data:  # the target the queue was built under: a new one starts it over
        state.sla = float(data["sla"])
    if "file_sizes" in data:  # models told apart by their file
        state.file_sizes = {str(n): int(b) for n, b in zip(data["file_names"], data["file_sizes"])}
    if "file_since" in data:  # where a started-over model's labels begin
        since = zip(data["file_names"], data["file_since"])
        state.file_since = {str(n): int(d) for n, d in since if d}
    if "settled_ids" in data:  # the last turns settled
        state.settled_ids = dict.fromkeys(int(i) for i in data["settled_ids"])
    if "stopped_at" in data:  # saved by a clean stop, or by follow_log when it dropped every id
        state.stopped_at = int(data["stopped_at"])
    if "log_id" in data:  # the decision log its ids name turns of
        state.log_id = str(data["log_id"])


def _check_shapes(data: np.lib.npyio.NpzFile) -> None:
    """A file can be a valid zip of the right version and still hold arrays of the wrong shape, which would
    fail every routed turn with an IndexError; check each array against what ``save`` writes."""
    n = len(data["names"]) if data["names"].ndim == 1 else -1
    pending = len(data["pending_ids"]) if data["pending_ids"].ndim == 1 else -1
    expected = {
        "q": (),
        "t": (),
        "settled": (),
        "satisfied_sum": (),
        "names": (n,),
        "weights": (n, DIM),
        "labels": (n,),
        "pending_ids": (pending,),
        "pending_models": (pending,),
        "pending_s": (pending,),
    }
    if "file_sizes" in data:  # files written before these were kept have none of them
        files = len(data["file_names"]) if data["file_names"].ndim == 1 else -1
        expected.update(sla=(), file_names=(files,), file_sizes=(files,))
        if "file_since" in data:
            expected.update(file_since=(files,))
    if "settled_ids" in data and data["settled_ids"].ndim != 1:
        raise ValueError(f"settled_ids has shape {data['settled_ids'].shape}, expected one dimension")
    if "stopped_at" in data:
        expected.update(stopped_at=())
    if "log_id" in data:
        expected.update(log_id=())
    for key, shape in expected.items():
        if data[key].shape != shape:
            raise ValueError(f"{key} has shape {data[key].shape}, expected {shape}")


def _check_values(state: MessPlusState) -> None:
    """Values no daemon writes: a file holding them was damaged or made by hand, and would be reported as
    nonsense (an attained share of -1e300) or route on saturated predictions."""
    if state.t < 0 or state.settled < 0 or any(c < 0 for c in state.labels.values()):
        raise ValueError("a negative count")
    if not (math.isfinite(state.satisfied_sum) and -1e-6 <= state.satisfied_sum <= state.settled + 1e-6):
        raise ValueError(f"satisfied_sum {state.satisfied_sum} is not within [0, settled = {state.settled}]")
    # a turn's label takes its prediction back out of the sum and the queues: a NaN there set Z to -q_cap
    # (a full surplus, routing cheaper than the SLA allows) and the sum to NaN, which the next start set aside
    wrong = next((i for i, (_, s) in state.pending.items() if not (math.isfinite(s) and 0.0 <= s <= 1.0)), None)
    if wrong is not None:
        raise ValueError(f"the prediction kept for turn {wrong} is {state.pending[wrong][1]}, not within [0, 1]")
    heads = [(f"confidence head of {n}", h.weights, h.seen) for n, h in state.confidence.items()]
    for what, weights, seen in [*heads, *((f"weights of {n}", w, 0) for n, w in state.weights.items())]:
        if seen < 0 or not bounded(weights):
            raise ValueError(f"{what}: a weight beyond {WEIGHT_LIMIT:g} or a negative count")


def _prior_weights(prior: float) -> np.ndarray:
    w = np.zeros(DIM, dtype=np.float64)
    p = min(max(prior, 1e-3), 1 - 1e-3)
    w[HASH_DIM] = math.log(p / (1 - p))  # the bias feature
    return w
