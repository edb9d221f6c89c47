"""The price of satisfaction that meets the SLA under the predictor's own forecasts (MESS+'s feed-forward term).

MESS+ picks argmin_a V * cost_a + Q * (alpha - s_hat_a): in cost units, satisfaction is priced at Q / V. With
Q alone setting that price, each turn's label moves it by up to 1 / V, so at a small V the queue's swings
decide more than the per-turn prediction (issue #18), and at a large V Q needs hundreds of turns to build up,
missing the SLA meanwhile. This window holds the recent turns' (cost, s_hat) per action and returns the least
price at which those turns, each routed by the rule, would be predicted to reach alpha on average. With
calibrated s_hat that price alone keeps the SLA; the queue then only corrects the predictor's bias, so V can
be large (a fine-grained correction) without a build-up. Updated incrementally: a turn adds its breakpoints
(the prices at which its choice moves to a more satisfying action) to one sorted list, and leaves it again.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence

import numpy as np

WINDOW = 256


def breakpoints(options: Sequence[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """For one turn's (cost, s_hat) per action: the s_hat of the action chosen at price 0 (the cheapest, the
    most satisfying among equally cheap), and each (price, satisfaction gained) at which the rule's choice
    moves up the upper convex hull of the options."""
    cost, s = min(options, key=lambda o: (o[0], -o[1]))
    base, steps = s, list[tuple[float, float]]()
    while True:
        better = [((c - cost) / (t - s), c, t) for c, t in options if t > s]
        if not better:
            return base, steps
        price, cost, new = min(better)
        steps.append((max(0.0, price), new - s))
        s = new


class SlaPrice:
    """Recent turns' breakpoints, sorted by price, and the sum of their price-0 satisfactions. The answer
    moves little from one turn to the next, so a pointer into the sorted list is kept with the sum of the
    gains below it (``included``, ``gained``) and moved a few places per turn: microseconds, not a walk."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.turns: deque[tuple[float, list[tuple[float, float]]]] = deque()
        self.sorted: list[tuple[float, float]] = []
        self.base_sum = 0.0
        self.included, self.gained = 0, 0.0
        self.added = 0

    def add(self, options: Sequence[tuple[float, float]]) -> None:
        base, steps = breakpoints(options)
        self.added += 1
        self.turns.append((base, steps))
        self.base_sum += base
        for step in steps:
            at = bisect.bisect_right(self.sorted, step)
            self.sorted.insert(at, step)
            if at < self.included:
                self.included, self.gained = self.included + 1, self.gained + step[1]
        if len(self.turns) > self.window:
            old_base, old_steps = self.turns.popleft()
            self.base_sum -= old_base
            for step in old_steps:
                at = bisect.bisect_left(self.sorted, step)
                del self.sorted[at]
                if at < self.included:
                    self.included, self.gained = self.included - 1, self.gained - step[1]
            if self.added % 64 == 0:  # sums drift by rounding: recount now and then
                self.base_sum = sum(b for b, _ in self.turns)
                self.gained = sum(g for _, g in self.sorted[: self.included])

    def price(self, alpha: float) -> float:
        """The least price at which the window's turns reach ``alpha`` on average by their predictions (the
        highest breakpoint when no price does: then the queue has to make up the rest)."""
        need = alpha * len(self.turns) - self.base_sum
        if need <= 0.0 or not self.sorted:
            return 0.0
        steps, i, gained = self.sorted, self.included, self.gained
        while i < len(steps) and gained < need:
            gained += steps[i][1]
            i += 1
        while i > 1 and gained - steps[i - 1][1] >= need:
            i -= 1
            gained -= steps[i][1]
        self.included, self.gained = i, gained
        return steps[i - 1][0] if i else steps[-1][0]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The window for the state file: each turn's base, and its steps as rows (turn, price, gain)."""
        bases = np.array([base for base, _ in self.turns], dtype=np.float64)
        rows = [(i, p, g) for i, (_, steps) in enumerate(self.turns) for p, g in steps]
        return bases, np.array(rows, dtype=np.float64).reshape(-1, 3)

    def restore(self, bases: np.ndarray, steps: np.ndarray) -> None:
        """The window ``arrays`` wrote, checked first (ValueError: the state file is set aside as damaged): a
        window longer than this one's stayed that long for good, as each turn drops only one, and a NaN or a
        negative price in it set every price after, or a row named another turn than its own."""
        _check_window(bases, steps, self.window)
        per_turn: list[list[tuple[float, float]]] = [[] for _ in bases]
        for i, p, g in steps.tolist():
            per_turn[int(i)].append((p, g))
        for base, turn in zip(bases.tolist(), per_turn):
            self.turns.append((base, turn))
            self.base_sum += base
            self.sorted.extend(turn)
        self.sorted.sort()
        self.included, self.gained = 0, 0.0


def _check_window(bases: np.ndarray, steps: np.ndarray, window: int) -> None:
    """What ``SlaPrice.arrays`` writes: at most ``window`` turns, each a satisfaction in [0, 1], and steps that
    name one of them, at a finite price >= 0, each gaining a satisfaction in (0, 1]."""
    if bases.ndim != 1 or len(bases) > window or steps.ndim != 2 or steps.shape[1] != 3:
        raise ValueError(f"price window of shapes {bases.shape} and {steps.shape}, expected (<= {window},), (n, 3)")
    turn, price, gain = steps.T
    if not (np.all(np.isfinite(bases)) and np.all(np.isfinite(steps))):
        raise ValueError("price window holds a value that is not finite")
    if np.any((bases < 0) | (bases > 1)) or np.any((gain <= 0) | (gain > 1)) or np.any(price < 0):
        raise ValueError("price window holds a satisfaction beyond [0, 1] or a negative price")
    if np.any((turn != np.floor(turn)) | (turn < 0) | (turn >= len(bases))):
        raise ValueError("price window holds a step of no turn in it")
