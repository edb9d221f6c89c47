"""Where a turn is answered and which attachments go with it.

Candidates are every local model and every cloud model (each with a choice of attachments to upload).
Masks remove what may not happen: the cloud when none is configured, the breaker is open, the device is
offline or today's money cap is reached; private attachments never leave the device; images never go to
a model that cannot see them. Among what is left, a forced location or the configured mode decides, and
in ``auto`` mode the router (MESS+ with the TMO policy, see locod.policy) does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from locod.daemon.attachments import PreparedAttachment
from locod.daemon.config import Config


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
class Decision:
    location: str  # "local" | "cloud"
    model: str
    send: tuple[int, ...]  # indices of the turn's attachments uploaded (cloud only)
    reason: str
    explored: bool = False
    routing: dict[str, object] = field(default_factory=dict)


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
