"""A labelled turn of a device's decision log as training reads it (`locod policy train --from-db`).

What the policy would have observed for the turn, and what answering it where it was answered cost.
daemon/records.py builds these from its rows (it alone knows the log's columns and their JSON), reading
what the turn recorded as the policy observes it (``logged_observation``); policy/tmo_env.py replays them
as episodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from locod.policy.observation import ObsInputs, Slot
from locod.policy.tasks import TASKS


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


def logged_observation(
    task: str, prompt_chars: int, offered: list[dict[str, Any]], telemetry: dict[str, Any]
) -> ObsInputs:
    """What the policy would have observed for a logged turn, from what its record holds: the offered
    attachments' summaries (``PreparedAttachment.summary``) and the telemetry snapshot (``Snapshot.row``),
    as the turn wrote them."""
    battery = telemetry.get("battery_pct")
    return ObsInputs(
        task=task if task in TASKS else "chat",
        prompt_chars=prompt_chars,
        slots=[Slot(float(a.get("relevance", 0.0)), a.get("kind") == "image", bool(a.get("private"))) for a in offered],
        battery=(100 if battery is None else battery) / 100,
        on_ac=telemetry.get("on_ac"),
        online=telemetry.get("online"),
        link=telemetry.get("link", "unknown"),
    )
