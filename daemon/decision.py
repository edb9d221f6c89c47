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
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locod.daemon.attachments import PreparedAttachment
from locod.daemon.catalog import manifest_path
from locod.daemon.config import Config, gguf_path_hint, load_config
from locod.daemon.regular_file import file_stamp
from locod.errors import ConfigError, ModelError, UnknownModel
from locod.policy.messplus import RecordedFeatures
from locod.protocol import NO_CONFIG_FILE
from locod.words import dollars, quoted


@dataclass(frozen=True)
class CloudAccess:
    """Why the cloud may or may not be used for this turn: what blocks every cloud model (the device's link,
    money), and which endpoints' breakers are open (one endpoint's failures never block another's)."""

    configured: bool
    online: bool | None
    # Today's spend and what the cloud calls decided on may cost yet (``held_usd`` of it): what the cap counts.
    spent_today_usd: float
    daily_cap_usd: float
    battery_critical: bool = False  # blocks no cloud model: it masks the local ones while a cloud one is open
    open_breakers: frozenset[str] = frozenset()  # cloud model names whose endpoint's breaker is open
    held_usd: float = 0.0

    @property
    def blocked_by(self) -> str | None:
        if not self.configured:
            return "no cloud model is configured"
        if self.online is False:
            return "the device is offline (no network link)"
        if (left := self.cap_left) is not None and left <= 0:
            return (
                f"today's cloud spend {self._spent()} reached the cap {dollars(self.daily_cap_usd)} "
                "until local midnight (cloud.daily_cap_usd: raise it and `locod reload` to use the cloud today)"
            )
        return None

    @property
    def cap_left(self) -> float | None:
        """What the daily cap leaves today's cloud calls (below 0 once spent past it); None: no cap is set."""
        return self.daily_cap_usd - self.spent_today_usd if self.daily_cap_usd > 0 else None

    def over_cap(self, usd: float, answer_tokens: int) -> str | None:
        """Why a cloud call that may cost ``usd`` (at ``answer_tokens`` of answer) is not made: it could take
        today's spend past the cap. None when it fits, or there is no cap."""
        left = self.cap_left
        if left is None or usd <= left:
            return None
        return (
            f"a cloud answer of up to {answer_tokens} tokens may cost {dollars(usd)}, more than the "
            f"{dollars(max(0.0, left))} left of today's cap {dollars(self.daily_cap_usd)} after today's cloud "
            f"spend {self._spent()} (cloud.daily_cap_usd: a higher cap or a lower max_tokens lets it)"
        )

    def _spent(self) -> str:
        held = self.held_usd
        return dollars(self.spent_today_usd) + (f" (of it {dollars(held)} held for calls under way)" if held else "")

    def blocked_for(self, model: str) -> str | None:
        if self.blocked_by:
            return self.blocked_by
        if model in self.open_breakers:
            return f"the circuit breaker of {model}'s endpoint is open after repeated failures"
        return None


@dataclass(frozen=True)
class Routing:
    """What the rule weighed for a routed turn, per candidate action (keys: a model name, or for the cloud
    with a policy ``model|cloud+0,2``): the mask over every action, then for the unmasked ones the
    normalised cost, the predicted satisfaction and the policy's probability; MESS+'s queue and targets."""

    action: str  # the candidate chosen (after a fallback: the local model that answered)
    # of the chosen action (after an escalation or a fallback, of the one that answered): a label trains on these
    features: RecordedFeatures
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
class Escalation:
    """Answer locally, escalate if unsure: the local action that answers first, the cloud action an unsure
    answer gives way to, and what the rule weighs at the answer's checkpoint (``Learner.checkpoint``)."""

    local_key: str
    key: str  # the cloud action
    model: str
    send: tuple[int, ...]
    margin: float  # the cloud's cost beyond keeping the local answer, policy terms included (cost units)
    s_cloud: float
    s_prompt: float  # the local model's s_hat before it answered, which its answer's confidence corrects
    tokens: int  # the answer is judged over its first tokens (held back until then)
    features: RecordedFeatures  # of the cloud action: what a label of the escalated turn trains


@dataclass(frozen=True)
class Decision:
    location: str  # "local" | "cloud"
    model: str
    send: tuple[int, ...]  # indices of the turn's attachments uploaded (cloud only)
    reason: str
    explored: bool = False
    routing: Routing | None = None  # None when the client or the config fixed the answer
    notice: str | None = None  # said to the user: the answer does not come from where they asked
    escalation: Escalation | None = None  # local first; where an unsure answer goes

    def fallen_back(self, local_model: str, why: str, features: RecordedFeatures) -> Decision:
        """The same turn answered by the local model after the cloud failed. The routing state goes along:
        the turn still counts for the SLA (with the local model's prediction) and an explored turn is still
        graded, its label training the local model on ``features``, the turn as that model saw it."""
        routing = self.routing and dataclasses.replace(self.routing, action=local_model, features=features)
        return Decision("local", local_model, (), f"{self.reason}; fell back: {why}", self.explored, routing)

    def answered(self, s_answered: float, explored: bool) -> Decision:
        """A local answer that was judged and kept (``explored``: by an exploration turn at its checkpoint):
        the queue settles with the s_hat its confidence gave."""
        if self.routing is None:
            return self
        s_hat = {**self.routing.s_hat, self.routing.action: s_answered}
        routing = dataclasses.replace(self.routing, s_hat=s_hat)
        return dataclasses.replace(self, routing=routing, explored=self.explored or explored)

    def escalated(self, why: str, explored: bool) -> Decision:
        """The same turn sent to the cloud after its local answer was judged (unsure, or ``explored``)."""
        assert self.escalation is not None
        plan = self.escalation
        routing = self.routing and dataclasses.replace(self.routing, action=plan.key, features=plan.features)
        reason = f"{self.reason}; escalated: {why}"
        return Decision("cloud", plan.model, plan.send, reason, self.explored or explored, routing)

    def noted(self, note: str, notice: str | None = None) -> Decision:
        """With ``note`` added to the reason, and ``notice`` to what the user is told."""
        notices = " ".join(n for n in (self.notice, notice) if n) or None
        reason = f"{self.reason}; {note}" if note else self.reason
        return dataclasses.replace(self, reason=reason, notice=notices)


def uploadable(attachments: list[PreparedAttachment], vision: bool) -> list[int]:
    """Attachments that may go to a cloud model: never private ones, images only if it can see them."""
    return [i for i, a in enumerate(attachments) if not a.private and (vision or a.kind != "image")]


def unsent_images(attachments: list[PreparedAttachment], send: tuple[int, ...]) -> str:
    """The images, not private, that a cloud model answering with ``send`` does not get (its routing left
    them out, or it takes no images), by name; empty: none."""
    return ", ".join(a.name for i, a in enumerate(attachments) if a.kind == "image" and not a.private and i not in send)


def withheld_note(
    attachments: list[PreparedAttachment], send: tuple[int, ...], location: str
) -> tuple[str, str | None]:
    """The part of a reason that says which attachments stayed behind, and why; and the notice for the
    user when an image they gave is not seen by the model that answers (private ones stay behind as asked)."""
    notes, notice = [], None
    images = [a.name for i, a in enumerate(attachments) if a.kind == "image" and i not in send]
    if location == "local" and images:
        notes.append(f"the local model cannot see images, withheld: {', '.join(images)}")
        notice = f"answered locally by a model that cannot see images; not seen: {', '.join(images)}"
    if location == "cloud" and (unsent := unsent_images(attachments, send)):
        notes.append(f"not uploaded: {unsent}")
        notice = f"answered in the cloud without uploading every image; not seen: {unsent}"
    private = [a.name for a in attachments if a.private]
    if location == "cloud" and private:
        notes.append(f"private, kept on device: {', '.join(private)}")
    return "; ".join(notes), notice


def fixed_decision(
    config: Config,
    force: str | None,
    model: str | None,
    attachments: list[PreparedAttachment],
    access: CloudAccess,
    left_out: Callable[[], Mapping[str, ModelError]] = dict,
    over_cap: Callable[[str, tuple[int, ...]], str | None] = lambda model, send: None,
) -> Decision | None:
    """The decision when the client or the config fixes the location; None when the router should decide.
    A cloud that is asked for but blocked is answered locally, and the user is told why; so is a forced
    location that the named model contradicts (the model wins). ``left_out``: asked for the local models
    routing leaves out for their file only when a refusal of an unknown name tells them apart from those it
    may send (each is a look at a file: no work for a turn that names a model there is). ``over_cap``: why
    a cloud model sent ``send`` could pass the daily cap with this turn (``CloudAccess.over_cap``), if so."""
    if model is not None:
        decision = _named(config, model, attachments, access, left_out, over_cap)
        if force is None or force == decision.location or decision.notice:  # a notice: the cloud was blocked
            return decision
        why = f"force {force} was ignored: the request named {model}, which answers {decision.location}"
        return decision.noted(why, notice=why)
    where = force or (config.routing.mode if config.routing.mode != "auto" else None)
    origin = "the request forced" if force else "routing.mode is"
    if where == "local":
        return Decision("local", config.local.default, (), f"{origin} local")
    if where == "cloud":
        cloud = config.cloud_model(config.cloud.default) if config.cloud.models else None
        send = tuple(uploadable(attachments, cloud.vision)) if cloud else ()
        blocked = (access.blocked_for(cloud.name) or over_cap(cloud.name, send)) if cloud else access.blocked_by
        if blocked or cloud is None:
            return _instead(config, f"{origin} cloud", "the cloud was asked for", blocked or "")
        return Decision("cloud", cloud.name, send, f"{origin} cloud")
    return None


def _named(
    config: Config,
    model: str,
    attachments: list[PreparedAttachment],
    access: CloudAccess,
    left_out: Callable[[], Mapping[str, ModelError]],
    over_cap: Callable[[str, tuple[int, ...]], str | None],
) -> Decision:
    """The decision for a request that names its model."""
    if any(m.name == model for m in config.local.models):
        return Decision("local", model, (), "the request named this local model")
    named = next((m for m in config.cloud.models if m.name == model), None)
    if named is None:
        raise unknown_model(Offered.of(config), model, left_out())
    send = tuple(uploadable(attachments, named.vision))
    blocked = access.blocked_for(model) or over_cap(model, send)
    if blocked:
        return _instead(config, f"the request named {model}", f"{model} was asked for", blocked)
    return Decision("cloud", model, send, "the request named this cloud model")


@dataclass(frozen=True)
class Offered:
    """The models a daemon offers by name, with what a user may type for one instead (a cloud model's endpoint
    id, a local model's GGUF file): from its config, or from a running daemon's as its ``config`` op sends it,
    so that `locod chat --model` refuses a name before the first turn as the daemon refuses it in one."""

    local: Mapping[str, str]  # name: its GGUF file's path, as configured (absolute, or in models_dir)
    cloud: Mapping[str, str]  # name: its endpoint's model id
    source: str | None  # the config file, None for none
    models_dir: Path

    @classmethod
    def of(cls, config: Config) -> Offered:
        return cls(
            {m.name: m.path for m in config.local.models},
            {m.name: m.model for m in config.cloud.models},
            None if config.source == NO_CONFIG_FILE else config.source,
            config.models_dir,
        )

    @classmethod
    def described(cls, config: Mapping[str, Any]) -> Offered:
        """From the running daemon's configuration as plain data (``as_dict``, the ``config`` op's reply)."""
        source = config["source"]
        return cls(
            {m["name"]: m["path"] for m in config["local"]["models"]},
            {m["name"]: m["model"] for m in config["cloud"]["models"]},
            None if source == NO_CONFIG_FILE else source,
            Path(config["paths"]["models_dir"]),
        )

    def file_of(self, name: str) -> str | None:
        """The local model whose GGUF file ``name`` names: its path as configured or typed (a ``.gguf``'s, the
        only one looked up on disk), its file name, or its stem in any case (``SmolLM2-135M-Instruct.Q4_1``)."""
        typed = Path(os.path.expanduser(name)) if name.lower().endswith(".gguf") else None
        for model, path in self.local.items():
            file = self.models_dir / os.path.expanduser(path)  # an absolute path stays itself
            if name in (path, file.name) or name.lower() == file.stem.lower() or _same_file(typed, file):
                return model
        return None


def _same_file(typed: Path | None, file: Path) -> bool:
    """Whether the path a user typed is the configured file (relative to where they are, symlinks followed)."""
    if typed is None:
        return False
    try:
        return typed.resolve() == file.resolve()
    except (OSError, ValueError):  # a name no path can be: too long, a NUL
        return False


def unknown_model(offered: Offered, name: str, left_out: Mapping[str, ModelError]) -> UnknownModel:
    """The error for a request naming no model ``offered``: the models it may name instead (those routing
    leaves out for their file apart, with why), then what the name was meant as (``meant_instead``)."""
    local = [m for m in offered.local if m not in left_out]
    listed = f"local models: {local}, cloud models: {list(offered.cloud)}{left_out_note(left_out, offered)}"
    return UnknownModel(f"no model named {quoted(name)}; {listed}{meant_instead(offered, name, left_out)}")


def meant_instead(offered: Offered, name: str, left_out: Mapping[str, ModelError]) -> str:
    """What a refusal of an unknown model name adds, in the same words at every door (``locod ask`` and
    ``chat``, the socket, the HTTP API): the name meant when it is a cloud model's endpoint id or a local
    model's file, by path or stem (else another's in other case, or the config's way to use a GGUF file it
    names), and `locod reload` when the config file or the models directory has it now (added, or pulled,
    after this daemon last read them); "" when none applies."""
    shown = quoted(name)
    meant = [m for m, model_id in offered.cloud.items() if model_id == name]
    local_file = offered.file_of(name)
    if meant:  # the endpoint's model id, as the provider's docs and the config's `model` key spell it
        said = f"; {shown} is the endpoint's model id of cloud model {meant[0]!r}: name {meant[0]!r}"
    elif local_file is not None:  # the file the user downloaded, as Ollama's and llama.cpp's users name one
        said = f"; {shown} is the GGUF file of local model {local_file!r}: name {local_file!r}"
    else:
        meant = [n for n in [*offered.local, *offered.cloud] if n.lower() == name.lower()]
        said = (f"; names are case-sensitive: {meant[0]!r}" if meant else "") + gguf_path_hint(name)
    if name in (names_now(offered) or ()):
        said += f"; {shown} was added after the daemon last read its configuration: run `locod reload`"
    return said


# Why a local model is left out, by its file's error code, in a few words: the refusal of an unknown name lists
# them apart from the names it may send (naming one gives its file's whole story, as GET /v1/models/{id} does).
LEFT_OUT_BECAUSE = {
    "model_missing": "its file is missing or unreadable",
    "model_corrupt": "its file is no loadable GGUF",
}


def left_out_note(left_out: Mapping[str, ModelError], offered: Offered | None) -> str:
    """What a refusal of an unknown model name adds about the local models left out for their file, one short
    clause each: they are configured, but not on offer until their file can be loaded; "" when none is. One
    the configuration no longer holds (`locod models rm` deleted its file and its entry) is not named: no
    file will bring it back, and the next reload drops it."""
    now = names_now(offered) if offered is not None else None
    kept = sorted((name, e) for name, e in left_out.items() if now is None or name in now)
    if not kept:
        return ""
    why = ", ".join(f"{name!r} ({LEFT_OUT_BECAUSE.get(e.code, e.code)})" for name, e in kept)
    return f"; left out until their file can be loaded: {why}"


def names_now(offered: Offered) -> frozenset[str] | None:
    """The model names the configuration would hold if read now; None when it does not load."""
    files = (Path(offered.source) if offered.source else None, manifest_path(offered.models_dir))
    return _names_on_disk(offered.source, tuple(file_stamp(f) for f in files))


@functools.lru_cache(maxsize=4)
def _names_on_disk(source: str | None, stamps: tuple[tuple[int, int] | None, ...]) -> frozenset[str] | None:
    """The model names the configuration would hold if read now, None when it does not load; read again only
    when the config file or the pulled models' manifest changed (``stamps``), so a client naming unknown
    models costs no file reads."""
    try:
        now = load_config(source)
    except ConfigError:
        return None
    return frozenset([m.name for m in now.local.models] + [m.name for m in now.cloud.models])


def _instead(config: Config, origin: str, asked: str, blocked: str) -> Decision:
    """The local answer to a turn that asked for a blocked cloud."""
    notice = f"answered locally by {config.local.default}: {asked}, but {blocked}"
    return Decision("local", config.local.default, (), f"{origin}, but {blocked}", notice=notice)
