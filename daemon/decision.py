"""What a decision is: where a turn is answered, what goes with it, and, for a routed turn, what the rule
weighed. The record stores it (``Routing.columns``) and loads it back (``Routing.from_row``), the learner
settles and trains on it; nobody re-reads it as a dict.

Also the decisions that need no rule: the client named a model or forced a location, or the config fixes
one. Masks remove what may not happen: the cloud when none is configured, the breaker is open, the device
is offline or today's money cap is reached; private attachments never leave the device; images never go
to a model that cannot see them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from locod.daemon.attachments import PreparedAttachment
from locod.daemon.config import Config
from locod.policy.messplus import RecordedFeatures


@dataclass(frozen=True)
class CloudAccess:
    """Why the cloud may or may not be used for this turn."""

    configured: bool
    breaker_open: bool
    online: bool | None
    spent_today_usd: float
    daily_cap_usd: float
    battery_critical: bool = False

    @property
    def blocked_by(self) -> str | None:
        if not self.configured:
            return "no cloud model is configured"
        if self.breaker_open:
            return "the cloud circuit breaker is open after repeated failures"
        if self.online is False:
            return "the device is offline"
        if self.daily_cap_usd > 0 and self.spent_today_usd >= self.daily_cap_usd:
            return f"today's cloud spend ${self.spent_today_usd:.4f} reached the cap ${self.daily_cap_usd:.2f}"
        return None


@dataclass(frozen=True)
class Routing:
    """What the rule weighed for a routed turn, per candidate action (keys: a model name, or for the cloud
    with a policy ``model|cloud+0,2``): the mask over every action, then for the unmasked ones the
    normalised cost, the predicted satisfaction and the policy's probability; MESS+'s queue and targets."""

    action: str  # the candidate chosen (after a fallback: the local model that answered)
    features: RecordedFeatures  # of the chosen action: a later label trains on exactly these
    q: float
    sla: float
    v: float
    s_hat: dict[str, float]
    costs: dict[str, float]
    mask: dict[str, bool]
    probabilities: dict[str, float]  # by policy action name; empty without a policy
    policy_version: str | None

    @property
    def s_hat_taken(self) -> float | None:
        """The prediction for what answered: what the queue moves by until a label arrives."""
        return self.s_hat.get(self.action)

    def columns(self) -> dict[str, Any]:
        """The ``decisions`` columns this fills."""
        return {
            "action": self.action,
            "features": self.features.to_json(),
            "q": self.q,
            "sla": self.sla,
            "v": self.v,
            "s_hat": self.s_hat,
            "costs": self.costs,
            "mask": self.mask,
            "probabilities": self.probabilities,
            "policy_version": self.policy_version,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Routing | None:
        """Back from a decoded ``decisions`` row; None for a turn that was not routed (forced, fixed)."""
        features = RecordedFeatures.from_json(row.get("features"))
        if features is None:
            return None
        return cls(
            action=row.get("action") or row["model"],  # rows before migration 2 kept no action: the model's
            features=features,
            q=row["q"],
            sla=row["sla"],
            v=row["v"],
            s_hat=row.get("s_hat") or {},
            costs=row.get("costs") or {},
            mask=row.get("mask") or {},
            probabilities=row.get("probabilities") or {},
            policy_version=row.get("policy_version"),
        )


NO_ROUTING_COLUMNS: dict[str, Any] = {
    "action": None,
    "features": {},
    "q": None,
    "sla": None,
    "v": None,
    "s_hat": {},
    "costs": {},
    "mask": {},
    "probabilities": {},
    "policy_version": None,
}


@dataclass(frozen=True)
class Decision:
    location: str  # "local" | "cloud"
    model: str
    send: tuple[int, ...]  # indices of the turn's attachments uploaded (cloud only)
    reason: str
    explored: bool = False
    routing: Routing | None = None  # None when the client or the config fixed the answer

    def routing_columns(self) -> dict[str, Any]:
        return NO_ROUTING_COLUMNS if self.routing is None else self.routing.columns()

    def fallen_back(self, local_model: str, why: str) -> Decision:
        """The same turn answered by the local model after the cloud failed. The routing state goes along:
        the turn still counts for the SLA (with the local model's prediction) and an explored turn is still
        graded."""
        routing = None if self.routing is None else dataclasses.replace(self.routing, action=local_model)
        return Decision("local", local_model, (), f"{self.reason}; fell back: {why}", self.explored, routing)

    def noted(self, note: str) -> Decision:
        return self if not note else dataclasses.replace(self, reason=f"{self.reason}; {note}")


def uploadable(attachments: list[PreparedAttachment], vision: bool) -> list[int]:
    """Attachments that may go to a cloud model: never private ones, images only if it can see them."""
    return [i for i, a in enumerate(attachments) if not a.private and (vision or a.kind != "image")]


def withheld_note(attachments: list[PreparedAttachment], send: tuple[int, ...], location: str) -> str:
    """The part of a reason that says which attachments stayed behind, and why."""
    notes = []
    images = [a.name for i, a in enumerate(attachments) if a.kind == "image" and i not in send]
    if location == "local" and images:
        notes.append(f"the local model cannot see images, withheld: {', '.join(images)}")
    private = [a.name for a in attachments if a.private]
    if location == "cloud" and private:
        notes.append(f"private, kept on device: {', '.join(private)}")
    return "; ".join(notes)


def fixed_decision(
    config: Config, force: str | None, model: str | None, attachments: list[PreparedAttachment], access: CloudAccess
) -> Decision | None:
    """The decision when the client or the config fixes the location; None when the router should decide."""
    if model is not None:
        if any(m.name == model for m in config.local.models):
            return Decision("local", model, (), "the request named this local model")
        cloud = config.cloud_model(model)
        if access.blocked_by:
            return Decision("local", config.local.default, (), f"the request named {model}, but {access.blocked_by}")
        return Decision(
            "cloud", model, tuple(uploadable(attachments, cloud.vision)), "the request named this cloud model"
        )
    where = force or (config.routing.mode if config.routing.mode != "auto" else None)
    origin = "the request forced" if force else "routing.mode is"
    if where == "local":
        return Decision("local", config.local.default, (), f"{origin} local")
    if where == "cloud":
        if access.blocked_by:
            return Decision("local", config.local.default, (), f"{origin} cloud, but {access.blocked_by}")
        cloud = config.cloud_model(config.cloud.default)
        return Decision("cloud", cloud.name, tuple(uploadable(attachments, cloud.vision)), f"{origin} cloud")
    return None
