"""The local model's confidence in its own answer, and what it says about the answer being right.

A small model often knows when it is guessing: the log-probabilities of the tokens it chose are low. Measured
on the replay trace (scripts/confidence.py, docs/routing.md), the statistics of the whole short answer
predict its label; its first few tokens alone do not (the model opens with boilerplate such as "The word
... is"), and neither do the tokens that only repeat the prompt. So the features below are taken over the
whole answer and over its *content* tokens: those that carry a word the prompt does not contain.

``ConfidenceHead`` turns them into the local model's s_hat once it has answered: a logistic correction of
the prompt-only prediction, s = sigmoid(a * logit(s_prompt) + w . features + b), starting as the identity
(a = 1, w = b = 0) and learned online from the local model's labels.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FEATURES = ("mean", "min", "content_mean", "content_min", "unsure_share", "length")
FLOOR = -10.0  # a log-probability below this says no more than this does
_HALF = math.log(0.5)  # a token the model gave less than even odds
# The range of each feature (features() below).
_LOW = (FLOOR / 5.0, FLOOR / 10.0, FLOOR / 5.0, FLOOR / 10.0, 0.0, 0.0)
_HIGH = (0.0, 0.0, 0.0, 0.0, 1.0, 1.0)
_WORD = re.compile(r"[a-z0-9]+")


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


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


class ConfidenceHead:
    """s_hat of a local model that has answered: the prompt-only s_hat corrected by the answer's confidence.
    Weights: [a, w_1 .. w_k, b]."""

    def __init__(self, weights: np.ndarray | None = None, learning_rate: float = 0.2) -> None:
        self.weights = identity() if weights is None else np.asarray(weights, dtype=np.float64).copy()
        self.learning_rate = learning_rate
        self.seen = 0

    def inputs(self, s_prompt: float, conf: Sequence[float]) -> np.ndarray:
        return np.array((_logit(s_prompt), *conf, 1.0))

    def predict(self, s_prompt: float, conf: Sequence[float]) -> float:
        w = self.weights.tolist()
        return _sigmoid(w[0] * _logit(s_prompt) + sum(map(operator.mul, w[1:-1], conf)) + w[-1])

    def best(self, s_prompt: float) -> float:
        """s_hat of the most confident answer the features can describe: where, had the model answered with
        it, the turn would still go to the cloud, the model need not answer at all."""
        w = self.weights[1:-1].tolist()
        return self.predict(s_prompt, [hi if wi > 0 else lo for wi, lo, hi in zip(w, _LOW, _HIGH)])

    def train(self, s_prompt: float, conf: Sequence[float], satisfied: bool) -> None:
        x = self.inputs(s_prompt, conf)
        p = _sigmoid(float(self.weights @ x))
        rate = self.learning_rate / math.sqrt(1.0 + self.seen / 50.0)
        self.weights -= rate * ((p - float(satisfied)) * x + 1e-4 * self.weights)
        self.seen += 1


def identity() -> np.ndarray:
    w = np.zeros(len(FEATURES) + 2)
    w[0] = 1.0
    return w
