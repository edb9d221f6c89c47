"""The local model's confidence in its own answer, and what it says about the answer being right.

A small model often knows when it is guessing: the log-probabilities of the tokens it chose are low. Measured
on the replay trace (scripts/confidence.py, docs/routing.md), the statistics of the whole short answer
predict its label; its first few tokens alone do not (the model opens with boilerplate such as "The word
... is"), and neither do the tokens that only repeat the prompt. So the features below are taken over the
whole answer (in the daemon, its first ``routing.escalate_tokens``, which cover the trace's short answers:
``budget``) and over its *content* tokens: those that carry a word the prompt does not contain.

``ConfidenceHead`` turns them into the local model's s_hat once it has answered: a logistic correction of
the prompt-only prediction, s = sigmoid(a * logit(s_prompt) + (w + w_task) . features + b), starting as the
identity (a = 1, all w = b = 0) and learned online from the local model's labels. ``w_task`` is a correction
per task category (policy/tasks.py): how sure the model sounds means different things on arithmetic and on
trivia (measured: docs/routing.md), and a head without it must settle for one slope across them all.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from locod.policy.tasks import RUN_TOGETHER, TASKS

FEATURES = ("mean", "min", "content_mean", "content_min", "unsure_share", "length")
FLOOR = -10.0  # a log-probability below this says no more than this does
_HALF = math.log(0.5)  # a token the model gave less than even odds
# The range of each feature (features() below).
_LOW = (FLOOR / 5.0, FLOOR / 10.0, FLOOR / 5.0, FLOOR / 10.0, 0.0, 0.0)
_HIGH = (0.0, 0.0, 0.0, 0.0, 1.0, 1.0)
# A word: a run of letters and digits in any script (Cyrillic, Greek, accented Latin as English), or one
# kana or Han character, which are written without spaces between words: each stands for a word of its own,
# so the prompt's 法国 makes an answer's 法国 a repetition, as "france" would be in English.
_WORD = re.compile(rf"[{RUN_TOGETHER}]|[^\W_{RUN_TOGETHER}]+")


@dataclass(frozen=True)
class Answer:
    """What the local model said: its tokens and each token's log-probability, and the prompt it answered."""

    prompt: str
    tokens: Sequence[str]
    logprobs: Sequence[float]


def content_logprobs(answer: Answer, budget: int | None = None) -> list[float]:
    """Log-probs of the tokens (among the first ``budget``) that carry a word the prompt does not contain."""
    said = set(_WORD.findall(answer.prompt.lower()))
    out = []
    for token, lp in list(zip(answer.tokens, answer.logprobs))[:budget]:
        words = _WORD.findall(token.lower())
        if words and not all(w in said for w in words):
            out.append(lp)
    return out


def features(answer: Answer, max_tokens: int, budget: int | None = None) -> tuple[float, ...]:
    """FEATURES, scaled to about [-1, 1]; over the first ``budget`` tokens (all when None). Plain Python:
    it runs on every local answer, and numpy's per-call overhead would dominate 6 numbers."""
    lps = [max(FLOOR, lp) for lp in list(answer.logprobs)[:budget]] or [0.0]
    content = [max(FLOOR, lp) for lp in content_logprobs(answer, budget)] or lps
    return (
        sum(lps) / len(lps) / 5.0,
        min(lps) / 10.0,
        sum(content) / len(content) / 5.0,
        min(content) / 10.0,
        sum(lp < _HALF for lp in lps) / len(lps),
        min(len(answer.logprobs), budget or max_tokens, max_tokens) / max(max_tokens, 1),
    )


def judged(prompt: str, tokens: Sequence[str], logprobs: Sequence[float], budget: int) -> tuple[float, ...]:
    """FEATURES of a local answer as its checkpoint judges it: over its first ``budget`` tokens
    (``routing.escalate_tokens``), the length scaled to that many. The one definition for the daemon (the
    checkpoint, shadow answers) and for a trace's answers where a prior is fitted and the replay measures the
    rule: a length scaled to the trace's own answer limit instead (24 tokens for most of its tasks) made the
    daemon rate the same answer up to 0.13 likelier good than the prior and the replay had."""
    return features(Answer(prompt, tokens, logprobs), budget, budget)


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


class ConfidenceHead:
    """s_hat of a local model that has answered: the prompt-only s_hat corrected by the answer's confidence.
    Weights: [a, w_1 .. w_k, b, then w_task_1 .. w_task_k for each of TASKS]. Weights saved before the
    per-task terms existed (the first k + 2) load with those terms at 0."""

    def __init__(self, weights: np.ndarray | None = None, learning_rate: float = 0.2) -> None:
        self.weights = identity()
        if weights is not None:
            given = np.asarray(weights, dtype=np.float64)
            self.weights[: len(given)] = given[: len(self.weights)]
        self.learning_rate = learning_rate
        self.seen = 0

    def inputs(self, s_prompt: float, conf: Sequence[float], task: str) -> np.ndarray:
        x = np.zeros(len(self.weights))
        x[: _K + 2] = (_logit(s_prompt), *conf, 1.0)
        if task in _CROSS:
            x[_CROSS[task]] = conf
        return x

    def predict(self, s_prompt: float, conf: Sequence[float], task: str) -> float:
        w = self._slopes(task)
        return _sigmoid(self.weights[0] * _logit(s_prompt) + sum(map(operator.mul, w, conf)) + self.weights[_K + 1])

    def best(self, s_prompt: float, task: str) -> float:
        """s_hat of the most confident answer the features can describe: where, had the model answered with
        it, the turn would still go to the cloud, the model need not answer at all."""
        w = self._slopes(task)
        return self.predict(s_prompt, [hi if wi > 0 else lo for wi, lo, hi in zip(w, _LOW, _HIGH)], task)

    def train(self, s_prompt: float, conf: Sequence[float], task: str, satisfied: bool) -> None:
        x = self.inputs(s_prompt, conf, task)
        p = _sigmoid(float(self.weights @ x))
        rate = self.learning_rate / math.sqrt(1.0 + self.seen / 50.0)
        self.weights -= rate * ((p - float(satisfied)) * x + 1e-4 * self.weights)
        self.seen += 1

    def _slopes(self, task: str) -> list[float]:
        """Each feature's weight on a turn of ``task``: the shared one plus the task's correction. Plain
        Python: this runs at every checkpoint, on 6 numbers."""
        shared = self.weights[1 : _K + 1].tolist()
        if task not in _CROSS:
            return shared
        return [a + b for a, b in zip(shared, self.weights[_CROSS[task]].tolist())]


_K = len(FEATURES)
# Where each task's corrections sit in the weights.
_CROSS = {task: slice(_K + 2 + i * _K, _K + 2 + (i + 1) * _K) for i, task in enumerate(TASKS)}


def identity() -> np.ndarray:
    w = np.zeros(_K + 2 + _K * len(TASKS))
    w[0] = 1.0
    return w


WEIGHT_LIMIT = 1e4  # far beyond what regularised SGD on [-1, 1] features reaches


def bounded(weights: np.ndarray) -> bool:
    """Weights within WEIGHT_LIMIT (NaN and infinities are not): what a MESS+ state file must hold to load, so
    what a prior may hold to start one (a state started from a prior beyond it was set aside at every start)."""
    return float(np.abs(weights).max(initial=0.0)) < WEIGHT_LIMIT


def loadable(weights: np.ndarray) -> bool:
    """Weights a head can start from: this layout's, or the one before the per-task terms."""
    return weights.ndim == 1 and len(weights) in (_K + 2, len(identity())) and bool(np.all(np.isfinite(weights)))
