"""A labelled turn of a device's decision log as training reads it (`locod policy train --from-db`).

What the policy would have observed for the turn, and what answering it where it was answered cost.
daemon/records.py builds these from its rows (it alone knows the log's columns and their JSON);
policy/tmo_env.py replays them as episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from locod.policy.observation import ObsInputs


@dataclass(frozen=True)
class LoggedTurn:
    session: str
    turn: int
    backend: str  # where it was answered: local or cloud
    satisfied: bool
    latency_total_ms: float
    cost_usd: float
    energy_j: float
    observed: ObsInputs  # task, prompt size, the offered attachments as slots, power and link
