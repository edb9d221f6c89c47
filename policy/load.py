"""Load-aware routing: a turn answered locally waits for the turns ahead of it in the local queue.

The local model answers one turn at a time, so a local action's latency is its own answer plus the expected
wait, turns ahead x the recent turn time. That wait is a cost like money and energy: added to the local
actions' raw cost before MESS+ normalises the costs, so with a long queue turns go to the cloud wherever the
SLA's price allows (docs/routing.md). The recent turn time is an EWMA of measured local turns, so the wait
follows the device as it is now (a throttled laptop, a model swapped for a larger one).
"""

from __future__ import annotations

from dataclasses import dataclass

WAIT_REF_S = 10.0  # ten seconds of waiting weigh as much as rule.MONEY_REF_USD (a tenth of a cent)


@dataclass
class TurnTime:
    """EWMA of the local model's wall time per turn."""

    seconds: float = 1.0
    weight: float = 0.2
    # One turn counts as at most this many times the estimate: a turn that spanned a stopped process
    # (SIGSTOP, a debugger) or heavy swapping took minutes, and taken whole it priced every local turn as a
    # long wait for some twenty turns after; a model that really is slower is caught up with in a few turns.
    most_per_turn: float = 4.0

    def observe(self, seconds: float) -> None:
        if seconds >= 0.0:
            seconds = min(seconds, self.most_per_turn * self.seconds)
            self.seconds += self.weight * (seconds - self.seconds)

    def expected_wait_s(self, turns_ahead: int) -> float:
        return max(0, turns_ahead) * self.seconds


def wait_cost(wait_s: float) -> float:
    """The raw cost of waiting ``wait_s`` seconds, on the scale of the router's money and energy terms."""
    return max(0.0, wait_s) / WAIT_REF_S
