"""Deciding a turn: masks, then a fixed choice, or the routing rule (locod.policy.rule) over every allowed
action with MESS+'s predictions and queue and, when one is loaded, the TMO policy's probabilities.

The decider reads the learned state (daemon/learner.py) and never writes it, except for the exploration
step MESS+ counts in ``choose``; it holds the learner's lock for the whole decision, so a reload, which
swaps config, policy and MESS+ parameters together under that lock (``reload`` has the learner adopt the
new parameters there, carrying on from the state in memory), is seen entirely or not at all.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from locod.daemon.attachments import PreparedAttachment
from locod.daemon.cloud import CloudBackend
from locod.daemon.config import CloudModelConfig, Config
from locod.daemon.decision import (
    CloudAccess,
    Decision,
    Escalation,
    Routing,
    fixed_decision,
    uploadable,
    withheld_note,
)
from locod.daemon.fitting import MIN_ANSWER_TOKENS, TEMPLATE_SLACK_TOKENS
from locod.daemon.learner import Learner
from locod.daemon.local import LocalBackend
from locod.daemon.logs import Throttle
from locod.daemon.modelfile import ModelFiles
from locod.daemon.records import DecisionLog
from locod.daemon.tallies import Held
from locod.daemon.telemetry import Snapshot, TelemetrySampler
from locod.errors import ModelError, PolicyError, PromptTooLong
from locod.policy import rule
from locod.policy.load import wait_cost
from locod.policy.messplus import RecordedFeatures, TurnFeatures
from locod.policy.observation import (
    ACTION_NAMES,
    N_ACTIONS,
    SUBSETS,
    K,
    ObsInputs,
    PastTurn,
    Slot,
    Z,
    action_mask,
    observe,
)
from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy
from locod.words import dollars

if TYPE_CHECKING:
    from locod.daemon.turn import Turn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One thing the turn could do: a model, and for the cloud which attachments go with it."""

    key: str  # the model's name, or with a policy a cloud model's "name|upload subset" (ACTION_NAMES)
    model: str
    location: str  # "local" | "cloud"
    action: int  # index in the policy's action layout (0 local, 1 + subset)
    send: tuple[int, ...]  # indices of the turn's attachments uploaded (cloud only)


@dataclass(frozen=True)
class TurnView:
    """What the rule reads of a turn, computed once: every attachment as the rule sees it, and the K the
    policy sees (its slots, most relevant first)."""

    views: list[Slot]
    slots: list[int]

    @classmethod
    def of(cls, attachments: list[PreparedAttachment]) -> TurnView:
        views = [Slot(a.relevance, a.kind == "image", a.private) for a in attachments]
        slots = sorted(range(len(attachments)), key=lambda i: -attachments[i].relevance)[:K]
        return cls(views, slots)

    @property
    def slot_views(self) -> list[Slot]:
        return [self.views[i] for i in self.slots]


def policy_file(config: Config) -> Path:
    """routing.policy_path; unset, the one `locod policy train` wrote to the state directory, if any; else
    the policy shipped with locod."""
    if config.routing.policy_path:
        return Path(config.routing.policy_path)
    trained = config.state_dir / "policy.onnx"
    return trained if trained.is_file() else DEFAULT_POLICY


def _load_policy(config: Config, previous: OnnxPolicy | None) -> tuple[OnnxPolicy | None, str | None]:
    """The config's policy, or, when it fails its checks, the one loaded before (at start: none, routing
    with MESS+ alone), with the error that says which."""
    path = policy_file(config)
    try:
        policy = OnnxPolicy(path)
    except PolicyError as exc:
        kept = f"keeping policy {previous.version} from {previous.path}" if previous else "routing with MESS+ alone"
        error = f"{exc.message}; {kept}"
        log.error("%s", error)
        return previous, error
    log.info("routing policy %s loaded from %s", policy.version, path)
    return policy, None


class Decider:
    """Each turn's decision (``decide``), from the config, the learner's state, telemetry and the backends';
    it owns the routing policy it loads, at start and at each reload."""

    def __init__(
        self,
        config: Config,
        learner: Learner,
        records: DecisionLog,
        telemetry: TelemetrySampler,
        local: LocalBackend,
        cloud: CloudBackend,
    ) -> None:
        self.learner = learner
        self.records = records
        self.model_files = ModelFiles()
        self.telemetry = telemetry
        self.local = local
        self.cloud = cloud
        self.config = config
        self.policy, self.policy_error = _load_policy(config, previous=None)
        self._policy_failures = Throttle(log)
        self.policy_failed_turns = 0  # turns the loaded policy failed on (MESS+ decided them): status says it

    def reload(self, config: Config) -> str | None:
        """Take a new config: the policy reloaded and MESS+ given its parameters (the state in memory carries
        on: it holds what a failed save did not), both swapped under the learner's lock. A policy that fails
        its checks is refused and the one loaded before (if any) stays; status, the log and the returned
        message say so."""
        policy, error = _load_policy(config, previous=self.policy)
        priors = self.learner.priors(config)
        with self.learner.lock:
            self.learner.adopt(config, priors)
            if policy is not self.policy:
                self.policy_failed_turns = 0
            self.config, self.policy, self.policy_error = config, policy, error
        return error

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.config.routing.mode,
            "policy": self.policy.version if self.policy else None,
            "policy_error": self.policy_error,
            "policy_failed_turns": self.policy_failed_turns,
            "battery_critical_pct": self.config.routing.battery_critical_pct,
            "local_masked": self.local_masked(),
        }

    def local_masked(self) -> str | None:
        """Why routing masks every local model now, None when it does not: status says it from this rule, the
        turns' own (``_candidates``), as a turn would be decided now (short of the prompt's fit, which is the
        turn's). `locod status` recomputed it from the battery alone and said so with the cloud unusable."""
        if self.config.routing.mode != "auto":  # every other mode places the turn (decision.fixed_decision)
            return None
        access = self._access(self.telemetry.snapshot())
        return self._battery_note() if self._battery_masks_local(access, self._cloud_names()) else None

    @staticmethod
    def _battery_masks_local(access: CloudAccess, clouds: list[str]) -> bool:
        """The critical battery's rule: the local models wait while one of ``clouds`` may answer."""
        return access.battery_critical and any(access.blocked_for(name) is None for name in clouds)

    def _battery_note(self) -> str:
        pct = self.config.routing.battery_critical_pct
        return f"on battery below routing.battery_critical_pct ({pct:g}%), the cloud answers while it is usable"

    def _access(self, snapshot: Snapshot) -> CloudAccess:
        """What may keep a turn from the cloud now: none configured, open breakers, no network, today's
        spend against the daily cap, a critical battery."""
        critical = (
            snapshot.battery_pct is not None
            and snapshot.on_ac is False
            and snapshot.battery_pct < self.config.routing.battery_critical_pct
        )
        return CloudAccess(
            configured=bool(self.config.cloud.models),
            open_breakers=self.cloud.open_breakers(),
            online=snapshot.online,
            spent_today_usd=self.records.committed_today(),
            daily_cap_usd=self.config.cloud.daily_cap_usd,
            battery_critical=critical,
            held_usd=self.records.today.held(),
        )

    def decide(self, turn: Turn) -> tuple[Decision, Config, Snapshot, Held | None]:
        """The turn's decision, the configuration and device state it was made under (the turn runs under
        that configuration, and its record shows that device state, not a later sample's), and what its
        cloud call may cost held against the daily cap (None: it makes none), which the turn gives back
        when it ends (``DecisionLog.finish``): held under the lock the decision is made under, the next
        turn's decision counts it."""
        snapshot = self.telemetry.snapshot()
        with self.learner.lock:  # MESS+ state, and config and policy as one generation (see reload)
            decision, config = self._decide(turn, snapshot), self.config
            most = self._most(turn, decision)
            held = None if most is None else self.records.today.hold(most)
        notes = withheld_note(turn.attachments, decision.send, decision.location)
        return decision.noted(*notes), config, snapshot, held

    def _most(self, turn: Turn, decision: Decision) -> float | None:
        """What a cloud call the decision may make costs at most (the turn's whole max_tokens of answer);
        None when it makes none. An escalation's: its cloud action's, made if the local answer is unsure."""
        target = decision.escalation or (decision if decision.location == "cloud" else None)
        if target is None:
            return None
        return turn.cloud_price(self.config, target.model, target.send, turn.max_tokens())

    def _decide(self, turn: Turn, snapshot: Snapshot) -> Decision:
        access = self._access(snapshot)
        request = turn.request
        answer = turn.max_tokens()

        def over_cap(model: str, send: tuple[int, ...]) -> str | None:
            return access.over_cap(turn.cloud_price(self.config, model, send, answer), answer)

        fixed = fixed_decision(
            self.config, request.options.force, request.model, turn.attachments, access, self.left_out_files, over_cap
        )
        if fixed is not None:
            return fixed
        view = TurnView.of(turn.attachments)
        candidates, mask = self._candidates(turn, view, access)
        mess = self.learner.mess
        features = {key: self._features(turn, view, c) for key, c in candidates.items()}
        model_of = {key: c.model for key, c in candidates.items()}
        s_hat = dict(zip(candidates, mess.satisfaction_of_turn(list(features.values()), list(model_of.values()))))
        log_pi, probabilities = (
            self._policy(turn, snapshot, access, view, candidates, s_hat) if self.policy else (None, {})
        )
        costs = self._costs(turn, snapshot, candidates)
        plan = self._escalation(candidates, costs, s_hat, log_pi, features)
        if plan is None:
            choice = rule.choose(mess, costs, s_hat, model_of, log_pi, self.config.routing.weight_policy)
            chosen, explored = candidates[choice.key], choice.explored
        else:  # the rule chooses at the answer's checkpoint (Learner.checkpoint)
            chosen, explored = candidates[plan.local_key], False
        routing = Routing(
            action=chosen.key,
            features=RecordedFeatures.of(features[chosen.key]),
            q=mess.state.q,
            sla=mess.sla,
            v=mess.v,
            s_hat=s_hat,
            costs=costs,
            mask=mask,
            probabilities=probabilities,
            policy_version=self.policy.version if log_pi and self.policy else None,
        )
        reason = self._reason(turn, chosen, explored, routing, access, candidates, plan is not None)
        if plan is not None:
            reason += f"; escalates to {plan.model} if unsure"
        return Decision(chosen.location, chosen.model, chosen.send, reason, explored, routing, escalation=plan)

    def _escalation(
        self,
        candidates: dict[str, Candidate],
        costs: dict[str, float],
        s_hat: dict[str, float],
        log_pi: dict[str, float] | None,
        features: dict[str, TurnFeatures],
    ) -> Escalation | None:
        """Answer locally, escalate if unsure (routing.escalate): the best local action answers first and the
        best cloud action is where an unsure answer goes (both by the rule's objective at the current
        price); None when the rule should route the turn at once: no local or no cloud action, or even the
        most confident answer the local model's confidence head can describe would be escalated."""
        local = [c for c in candidates.values() if c.location == "local"]
        cloud = [c for c in candidates.values() if c.location == "cloud"]
        if not (self.config.routing.escalate and local and cloud):
            return None
        price = self.learner.mess.current_price
        extra = rule.policy_terms(log_pi, self.config.routing.weight_policy)

        def objective(c: Candidate) -> float:
            return costs[c.key] + extra.get(c.key, 0.0) - price * s_hat[c.key]

        target, first = min(cloud, key=objective), min(local, key=objective)
        # the cloud's cost beyond keeping the local answer, whose cost is spent by then (Escalation.margin)
        margin = costs[target.key] + extra.get(target.key, 0.0) - extra.get(first.key, 0.0)
        s_cloud, s_prompt = s_hat[target.key], s_hat[first.key]
        best = self.learner.mess.confidence_head(first.model).best(s_prompt, features[first.key].task)
        if rule.escalates(margin, price, s_cloud, best):
            return None
        return Escalation(
            first.key,
            target.key,
            target.model,
            target.send,
            margin,
            s_cloud,
            s_prompt,
            self.config.routing.escalate_tokens,
            RecordedFeatures.of(features[target.key]),
        )

    def _reason(
        self,
        turn: Turn,
        chosen: Candidate,
        explored: bool,
        routing: Routing,
        access: CloudAccess,
        candidates: dict[str, Candidate],
        planned: bool,
    ) -> str:
        """Why, in words, with the numbers it was decided on, then what was masked or left out; ``planned``:
        the rule chooses at the answer's checkpoint (answer locally, escalate if unsure)."""
        why = "explored (MESS+ exploration turn)" if explored else _trade_off(chosen, routing, candidates, planned)
        if chosen.key != chosen.model:  # one of the policy's upload actions, not the model alone
            why += f", action {ACTION_NAMES[chosen.action]}"
        if chosen.location == "local" and not any(c.location == "cloud" for c in candidates.values()):
            blocked = access.blocked_by or next(filter(None, map(access.blocked_for, self._cloud_names())), None)
            why += f"; cloud masked: {blocked or self._unfit_cloud_reason(turn, access)}"
        if chosen.location == "cloud" and not any(c.location == "local" for c in candidates.values()):
            why += f"; local masked: {self._unfit_local_reason(access)}"
        return why + self._left_out_locals(turn, candidates)

    def _left_out_locals(self, turn: Turn, candidates: dict[str, Candidate]) -> str:
        """The local models left out of a turn another local model was on offer for, each with why: `locod
        decisions ID` lists them "not on offer" and points here (no local at all: "local masked" says why)."""
        absent = [m for m in self.config.local.models if m.name not in candidates]
        if not absent or not any(c.location == "local" for c in candidates.values()):
            return ""  # the usual turn: no second look at the files or the context
        fits = self._fits_context(turn.prompt_tokens)
        unusable = dict.fromkeys(self._short_of_memory(), "too large for the memory available")
        unusable |= dict.fromkeys(self.left_out_files(), "no usable file")
        causes = [
            f"{m.name} ({unusable.get(m.name, 'its context cannot hold the prompt')})"
            for m in absent
            if m.name in unusable or not fits[m.name]
        ]
        return f"; not on offer: {', '.join(causes)}" if causes else ""

    def _unfit_local_reason(self, access: CloudAccess) -> str:
        """Why no local model was on offer: a critical battery while the cloud is usable, else the prompt."""
        if access.battery_critical:
            return self._battery_note()
        return "no local model's context holds the prompt"

    def _cloud_names(self) -> list[str]:
        return [m.name for m in self.config.cloud.models]

    def _unfit_cloud_reason(self, turn: Turn, access: CloudAccess) -> str:
        """Why no cloud action was on offer although the cloud is usable: the prompt or the daily cap, with
        the numbers a user can act on."""
        fits = self._fits_context(turn.prompt_tokens)
        holding = [name for name in self._cloud_names() if fits[name]]
        room = self._cap_room(turn, access)
        if not holding or room is None:
            return "no cloud model's context holds the prompt"
        left, answer = max(0.0, room[0]), room[1]
        cheapest = min(turn.cloud_price(self.config, name, (), answer) for name in holding)  # text alone
        said = f"{dollars(left)} is left of today's {dollars(access.daily_cap_usd)} cap (cloud.daily_cap_usd)"
        if cheapest <= left:  # text alone fits: MESS+ alone (no policy) uploads the images it finds relevant
            return f"{said}, and the images MESS+ would upload (usd_per_image) pass it: a higher cap lets it"
        return (
            f"{said}, and a cloud answer of up to {answer} tokens may cost {dollars(cheapest)}: a higher cap or a "
            "lower max_tokens lets it"
        )

    def _candidates(
        self, turn: Turn, view: TurnView, access: CloudAccess
    ) -> tuple[dict[str, Candidate], dict[str, bool]]:
        """Every allowed (model, upload) action, and the mask over all of them (for the record).

        With a policy loaded a cloud model is offered with each subset of the top-K slots (TMO's layout);
        without one, with the rule's one upload choice (``_cloud_actions``). The daily cap is a shield, as in
        training: a cloud action whose price, at the longest answer the turn allows, would take today's spend
        past the cap is masked before it could be chosen, not after the spend.
        """
        allowed: dict[str, Candidate] = {}
        mask: dict[str, bool] = {}
        fits = self._fits_context(turn.prompt_tokens)
        battery_masks = self._battery_masks_local(access, [name for name in self._cloud_names() if fits[name]])
        loadable = self._loadable()
        for local in self.config.local.models:
            mask[local.name] = loadable[local.name] and fits[local.name] and not battery_masks
            if mask[local.name]:
                allowed[local.name] = Candidate(local.name, local.name, "local", 0, ())
        for cloud in self.config.cloud.models:
            allowed_here = access.blocked_for(cloud.name) is None and fits[cloud.name]
            for key, candidate in self._cloud_actions(turn, view, cloud, allowed_here).items():
                mask[key] = candidate is not None
                if candidate is not None:
                    allowed[key] = candidate
        for key in self._over_cap(turn, allowed, access):
            del allowed[key]
            mask[key] = False
        if not allowed:  # everything masked: a local model that holds the prompt still answers
            holding = [m.name for m in self.config.local.models if fits[m.name] and loadable[m.name]]
            if not holding:
                raise PromptTooLong(self._too_long(turn.prompt_tokens))
            default = self.config.local.default if fits[self.config.local.default] else holding[0]
            allowed[default] = Candidate(default, default, "local", 0, ())
        return allowed, mask

    def _cloud_actions(
        self, turn: Turn, view: TurnView, cloud: CloudModelConfig, allowed: bool
    ) -> dict[str, Candidate | None]:
        """A cloud model's actions by key, None where masked: with a policy, one per subset of the top-K
        slots (``action_mask`` says which may go); without one, the rule's one upload choice."""
        if self.policy is None:
            if not allowed:
                return {cloud.name: None}
            send = rule.relevant_uploads(view.views, uploadable(turn.attachments, cloud.vision))
            return {cloud.name: Candidate(cloud.name, cloud.name, "cloud", 1, send)}
        offered = action_mask(view.slot_views, cloud_allowed=allowed, vision=cloud.vision)
        actions: dict[str, Candidate | None] = {}
        for action in range(1, N_ACTIONS):
            key = f"{cloud.name}|{ACTION_NAMES[action]}"
            actions[key] = None
            if offered[action] > 0:
                send = tuple(sorted(view.slots[k] for k in SUBSETS[action - 1]))
                actions[key] = Candidate(key, cloud.name, "cloud", action, send)
        return actions

    def _loadable(self) -> dict[str, bool]:
        unusable = self.left_out_files().keys() | self._short_of_memory()
        return {m.name: m.name not in unusable for m in self.config.local.models}

    def _short_of_memory(self) -> set[str]:
        """Local models the memory cannot hold now, the default left on offer as a missing file is: its turns
        fail by name (``model_too_large``) rather than vanish."""
        return self.local.short_of_memory() - {self.config.local.default}

    def left_out_files(self) -> dict[str, ModelError]:
        """Local models whose file cannot be loaded (missing, or not a GGUF), with why: left out of routing and
        of the HTTP API's model list. The default's file was checked at start and at each reload, and it stays
        on offer: were it gone, its turns fail by name (``model_missing``) rather than vanish."""
        config = self.config
        problems = {
            m.name: self.model_files.problem(m, config.models_dir)
            for m in config.local.models
            if m.name != config.local.default
        }
        return {name: problem for name, problem in problems.items() if problem is not None}

    def unusable_files(self) -> dict[str, str]:
        """Every local model whose file cannot be loaded now, with the error's code: status's health check,
        which names the default too (routing keeps it on offer whatever its file: its turns fail by name)."""
        config = self.config
        unusable = {name: problem.code for name, problem in self.left_out_files().items()}
        default = self.model_files.problem(config.local_model(config.local.default), config.models_dir, False)
        if default is not None:
            unusable[config.local.default] = default.code
        return unusable

    def refuse_unfit(self, prompt_tokens: int) -> None:
        """Refuse a prompt of ``prompt_tokens`` (estimated) that no model could hold, before any work on the
        turn's attachments."""
        if not any(self._fits_context(prompt_tokens).values()):
            raise PromptTooLong(self._too_long(prompt_tokens))

    def _fits_context(self, prompt_tokens: int) -> dict[str, bool]:
        """Whether each model's context can hold the turn's question (history can be trimmed, the question
        cannot) with room for an answer. Local contexts are known; a cloud model's is
        ``context_tokens`` (0: unknown, assumed to fit). Estimated from the text, in any script: the local
        model's own tokenizer has the last word when the prompt is fitted: ``Turn.prompt_tokens``, estimated
        once a turn."""
        needed = prompt_tokens + MIN_ANSWER_TOKENS + TEMPLATE_SLACK_TOKENS
        fits = {m.name: needed <= m.n_ctx for m in self.config.local.models}
        fits.update({m.name: not m.context_tokens or needed <= m.context_tokens for m in self.config.cloud.models})
        return fits

    def _too_long(self, prompt_tokens: int) -> str:
        contexts = [m.n_ctx for m in self.config.local.models] + [
            m.context_tokens for m in self.config.cloud.models if m.context_tokens
        ]
        return (
            f"the prompt needs about {prompt_tokens} tokens; no model that may answer it holds that (the largest "
            f"configured context is {max(contexts)} tokens)"
        )

    def _over_cap(self, turn: Turn, candidates: dict[str, Candidate], access: CloudAccess) -> list[str]:
        """Cloud actions that could take today's spend past the daily cap (the prompt as estimated, the
        turn's max_tokens of answer, the images uploaded)."""
        room = self._cap_room(turn, access)
        if room is None:
            return []
        left, answer = room
        cloud = [c for c in candidates.values() if c.location == "cloud"]
        return [c.key for c in cloud if turn.cloud_price(self.config, c.model, c.send, answer) > left]

    @staticmethod
    def _cap_room(turn: Turn, access: CloudAccess) -> tuple[float, int] | None:
        """What today's daily cap leaves a cloud answer to this turn: the USD left (below 0 once spent past
        it) and the answer's most tokens (the turn's max_tokens), which the shield (``_over_cap``) and the
        reason it gives (``_unfit_cloud_reason``) both price at; None when no cap is set."""
        left = access.cap_left
        return None if left is None else (left, turn.max_tokens())

    def _policy(
        self,
        turn: Turn,
        snapshot: Snapshot,
        access: CloudAccess,
        view: TurnView,
        candidates: dict[str, Candidate],
        s_hat: dict[str, float],
    ) -> tuple[dict[str, float] | None, dict[str, float]]:
        """log pi per candidate from the ONNX policy, and its probabilities by action name for the record;
        (None, {}) when it fails on this turn."""
        assert self.policy is not None
        actions = {c.action for c in candidates.values()}
        mask = np.array([float(a in actions) for a in range(N_ACTIONS)], dtype=np.float32)
        observation = observe(self._observation(turn, snapshot, access, view, self._best(candidates, s_hat)))
        try:
            log_pi = self.policy.log_probs(observation, mask).tolist()
        except PolicyError as exc:  # the record shows no policy version; the log says why, once a minute
            self.policy_failed_turns += 1
            self._policy_failures.say("policy", logging.ERROR, "%s; deciding with MESS+ alone", exc.message)
            return None, {}
        probabilities = {ACTION_NAMES[a]: round(math.exp(log_pi[a]), 5) for a in sorted(actions)}
        return {key: log_pi[c.action] for key, c in candidates.items()}, probabilities

    @staticmethod
    def _best(candidates: dict[str, Candidate], s_hat: dict[str, float]) -> dict[str, float]:
        """The best predicted satisfaction at each location."""
        best = {"local": 0.0, "cloud": 0.0}
        for key, c in candidates.items():
            best[c.location] = max(best[c.location], s_hat[key])
        return best

    def _observation(
        self, turn: Turn, snapshot: Snapshot, access: CloudAccess, view: TurnView, best: dict[str, float]
    ) -> ObsInputs:
        """What the policy observes (policy/observation.py's layout)."""
        cap = self.config.cloud.daily_cap_usd
        money_left = 1.0 if cap <= 0 else max(0.0, 1 - access.spent_today_usd / cap)
        energy_left = (snapshot.battery_pct or 100) / 100 if snapshot.on_ac is False else 1.0
        mess = self.learner.mess
        return ObsInputs(
            task=turn.task,
            prompt_chars=len(turn.request.prompt),
            slots=view.slot_views,
            history=[PastTurn(t.location, t.slots_sent, t.task) for t in turn.session.trail[-Z:]],
            battery=None if snapshot.battery_pct is None else snapshot.battery_pct / 100,
            on_ac=snapshot.on_ac,
            power_w=snapshot.power_w,
            cpu_pct=snapshot.cpu_pct,
            online=snapshot.online,
            link=snapshot.link,
            upload_bps=snapshot.upload_bps,
            rtt_ms=snapshot.rtt_ms,
            local_wait_s=self.local.expected_wait_s(),  # the turns ahead in the local queue (policy/load.py)
            budgets=(1.0, money_left, energy_left),
            q_norm=mess.state.q / max(mess.q_cap, 1e-9),
            s_local=best["local"],
            s_cloud=best["cloud"],
        )

    def local_features(self, turn: Turn) -> RecordedFeatures:
        """The turn as the local model would have seen it: what a shadow answer's label trains."""
        local = Candidate(self.config.local.default, self.config.local.default, "local", 0, ())
        return RecordedFeatures.of(self._features(turn, TurnView.of(turn.attachments), local))

    def _features(self, turn: Turn, view: TurnView, candidate: Candidate) -> TurnFeatures:
        trail = turn.session.trail
        send = None if candidate.location == "local" else candidate.send
        return rule.action_features(
            turn.request.prompt,
            turn.task,
            view.views,
            send,
            position=turn.session.turns,
            prev_cloud=bool(trail) and trail[-1].location == "cloud",
        )

    def _costs(self, turn: Turn, snapshot: Snapshot, candidates: dict[str, Candidate]) -> dict[str, float]:
        """Normalised cost per candidate: money, device energy (generation locally, the radio for uploads),
        weighted by routing.weight_money / weight_energy, and for a local answer the wait behind the local
        queue: with a long queue, turns go to the cloud where the SLA's price allows."""
        weights = self.config.routing
        wait = wait_cost(self.local.expected_wait_s())  # the turns ahead in the local queue (policy/load.py)
        raw: dict[str, float] = {}
        for key, c in candidates.items():
            if c.location == "local":
                joules = snapshot.joules_per_token or self.config.local_model(c.model).joules_per_token
                raw[key] = rule.local_cost(joules, weights.weight_energy) + wait
                continue
            usd = turn.cloud_price(self.config, c.model, c.send, rule.EXPECTED_ANSWER_TOKENS)
            upload = turn.upload_bytes(c.send)
            raw[key] = rule.cloud_cost(usd, upload, snapshot.upload_bps, weights.weight_money, weights.weight_energy)
        return rule.normalised(raw)


def _trade_off(chosen: Candidate, routing: Routing, candidates: dict[str, Candidate], planned: bool) -> str:
    """The rule's choice in words: the chosen action's predicted satisfaction and cost beside its likeliest
    rival's, and the SLA and queue that weighed them."""
    policy = " with the TMO policy" if routing.policy_version is not None else ""
    # another local model is a rival too, except to a planned escalation, whose rival is the cloud
    rivals = [
        c for c in candidates.values() if c.location != chosen.location or (not planned and c.model != chosen.model)
    ]
    choice = (
        "answers locally first"
        if planned
        else "the best trade of predicted satisfaction for cost"
        if rivals
        else "the only place on offer"
    )
    why = f"MESS+{policy}: {choice} ({_trade(chosen.key, routing)}"
    if rivals:
        rival = max(rivals, key=lambda c: routing.s_hat[c.key])
        why += f"; {rival.model}: {_trade(rival.key, routing)}"
    return why + f"; SLA {routing.sla:.2f}, Q {routing.q:.2f})"


def _trade(key: str, routing: Routing) -> str:
    """An action's predicted satisfaction (s_hat, as a user reads it) and cost, as a decision's reason shows them:
    "relative", since it is no money (1.00: the dearest action on offer) and stood beside the turn's "$0.00000"."""
    return f"{routing.s_hat[key]:.0%} likely good at relative cost {routing.costs[key]:.2f}"
