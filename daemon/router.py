"""The decision engine: masks, then a fixed choice or MESS+ (with the TMO policy when one is loaded).

It owns the learned routing state: it builds a turn's features, asks MESS+ for the model, picks the
attachments to upload, settles the queue after the turn, and takes labels (user feedback or judge).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from locod.daemon.attachments import PreparedAttachment
from locod.daemon.backends import Prompt
from locod.daemon.cloud import CloudBackend, Upload
from locod.daemon.config import Config
from locod.daemon.decide import CloudAccess, Decision, fixed_decision, uploadable, withheld_note
from locod.daemon.records import DecisionLog
from locod.daemon.telemetry import Snapshot, TelemetrySampler
from locod.errors import CloudError, PolicyError, UnknownDecision
from locod.policy.messplus import HASH_DIM, MessPlus, TurnFeatures, hashed_record, vectorize
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

if TYPE_CHECKING:
    from locod.daemon.turn import Turn

log = logging.getLogger(__name__)

# Priors before any label: a small local model satisfies about half the time, a cloud model most of it.
LOCAL_PRIOR, CLOUD_PRIOR = 0.5, 0.85
# Cost scales: a tenth of a cent weighs as much as 1 kJ of device energy (about 0.3 Wh, under 1 % of a
# laptop battery); an upload's radio draws ~2 W.
MONEY_REF_USD, ENERGY_REF_J, RADIO_W = 0.001, 1000.0, 2.0
EXPECTED_ANSWER_TOKENS = 200
MIN_RELEVANCE = 0.3
JUDGE_INSTRUCTIONS = (
    "You grade answers. Reply with exactly one word: YES if the answer correctly and helpfully answers the "
    "question, NO otherwise."
)
VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """One thing the turn could do: a model, and for the cloud which attachments go with it."""

    key: str
    model: str
    location: str
    action: int  # index in the policy's action layout (0 local, 1 + subset)
    send: tuple[int, ...]


@dataclass(frozen=True)
class PolicyTerm:
    extra: dict[str, float]
    probabilities: dict[str, float]
    version: str | None


def ranked_slots(attachments: list[PreparedAttachment]) -> list[int]:
    """The K attachments the policy sees, most relevant first (its slots)."""
    return sorted(range(len(attachments)), key=lambda i: -attachments[i].relevance)[:K]


def slot_views(attachments: list[PreparedAttachment], slots: list[int]) -> list[Slot]:
    """What the policy knows of each slot's attachment: relevance, image or not, private or not."""
    return [Slot(attachments[i].relevance, attachments[i].kind == "image", attachments[i].private) for i in slots]


class Router:
    def __init__(self, config: Config, records: DecisionLog, telemetry: TelemetrySampler, cloud: CloudBackend) -> None:
        self.records = records
        self.telemetry = telemetry
        self.cloud = cloud
        self._lock = threading.Lock()  # MESS+ state, config and policy are shared by the turn threads
        self._judge = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self._save_failed = False  # log a failing save once, not every turn
        self.reload(config)

    def reload(self, config: Config) -> None:
        """Take a new config: the MESS+ state is re-read with its parameters and the policy reloaded. A
        policy that fails its checks leaves routing to MESS+ alone, and says so in status and the log.

        Config, policy and MESS+ state are swapped together under the lock that ``decide`` holds, so a turn
        deciding during a reload sees either the old three or the new three, never a mix."""
        routing = config.routing
        path = Path(routing.policy_path) if routing.policy_path else DEFAULT_POLICY
        policy: OnnxPolicy | None = None
        error: str | None = None
        try:
            policy = OnnxPolicy(path)
            log.info("routing policy %s loaded from %s", policy.version, path)
        except PolicyError as exc:
            error = exc.message
            log.error("%s; routing with MESS+ alone", exc.message)
        priors = {m.name: LOCAL_PRIOR for m in config.local.models}
        priors.update({m.name: CLOUD_PRIOR for m in config.cloud.models})
        with self._lock:
            self.mess = MessPlus(  # read under the lock: a turn may be saving the state file
                priors,
                sla=routing.sla,
                v=routing.v,
                explore_c=routing.explore_c,
                q_cap=routing.q_cap,
                path=Path(config.paths.state_dir) / "messplus.npz",
            )
            self.config, self.policy, self.policy_error = config, policy, error

    # -- deciding ------------------------------------------------------------------------------------

    def access(self, snapshot: Snapshot) -> CloudAccess:
        critical = (
            snapshot.battery_pct is not None
            and snapshot.on_ac is False
            and snapshot.battery_pct < self.config.routing.battery_critical_pct
        )
        return CloudAccess(
            configured=bool(self.config.cloud.models),
            breaker_open=self.cloud.breaker.blocking,
            online=snapshot.online,
            spent_today_usd=self.records.spent_today(),
            daily_cap_usd=self.config.cloud.daily_cap_usd,
            battery_critical=critical,
        )

    def decide(self, turn: Turn) -> Decision:
        with self._lock:  # MESS+ state, and config and policy as one generation (see reload)
            return self._decide(turn)

    def _decide(self, turn: Turn) -> Decision:
        snapshot = self.telemetry.snapshot()
        access = self.access(snapshot)
        request = turn.request
        fixed = fixed_decision(self.config, request.options.force, request.model, turn.attachments, access)
        if fixed is not None:
            return self._with_notes(fixed, turn)
        slots = ranked_slots(turn.attachments)
        views = slot_views(turn.attachments, slots)
        candidates, mask = self.candidates(turn, slots, views, access)
        costs = self.costs(turn, snapshot, candidates)
        features = {key: self.features(turn, c) for key, c in candidates.items()}
        model_of = {key: c.model for key, c in candidates.items()}
        predicted = self.mess.satisfaction_of_turn(list(features.values()), list(model_of.values()))
        s_hat = dict(zip(candidates, predicted))
        policy = self._policy_term(turn, snapshot, access, views, candidates, s_hat)
        choice = self.mess.choose(costs, s_hat=s_hat, extra=policy.extra, model_of=model_of)
        q, attained = self.mess.state.q, self.mess.attained
        chosen = candidates[choice.key]
        if choice.explored:
            why = "explored (MESS+ exploration turn)"
        else:
            why = (
                f"MESS+{' + TMO policy' if policy.version else ''}: lowest V*cost + Q*(alpha - s_hat)"
                f"{' - w*log pi' if policy.version else ''} with Q={q:.2f}, s_hat={choice.s_hat[chosen.key]:.2f}"
            )
        if chosen.location == "cloud":
            why += f", action {chosen.key.split('|')[-1]}"
        if access.blocked_by and chosen.location == "local":
            why += f"; cloud masked: {access.blocked_by}"
        elif self.config.cloud.models and not any(c.location == "cloud" for c in candidates.values()):
            why += f"; cloud masked: no cloud action fits what is left of today's ${access.daily_cap_usd:.2f} cap"
        routing = {
            "action": chosen.key,
            "features": {  # of the chosen action: a later label trains on exactly what was decided on
                **{k: v for k, v in vars(features[chosen.key]).items() if k != "prompt"},
                "hashed": hashed_record(request.prompt),
            },
            "q": q,
            "sla": self.mess.sla,
            "v": self.mess.v,
            "s_hat": choice.s_hat,
            "costs": costs,
            "mask": mask,
            "attained": attained,
            "probabilities": policy.probabilities,
            "policy_version": policy.version,
        }
        decision = Decision(chosen.location, chosen.model, chosen.send, why, choice.explored, routing)
        return self._with_notes(decision, turn)

    def candidates(
        self, turn: Turn, slots: list[int], views: list[Slot], access: CloudAccess
    ) -> tuple[dict[str, Candidate], dict[str, bool]]:
        """Every allowed (model, upload) action, and the mask over all of them (for the record).

        With a policy loaded a cloud model is offered with each subset of the top-K slots (TMO's layout);
        without one, with the relevant uploadable attachments only. The daily cap is a shield, as in
        training: a cloud action whose price, at the longest answer the turn allows, would take today's
        spend past the cap is masked before it could be chosen, not after the spend.
        """
        attachments = turn.attachments
        out: dict[str, Candidate] = {}
        mask: dict[str, bool] = {}
        local_allowed = not (access.battery_critical and access.blocked_by is None)
        for local in self.config.local.models:
            mask[local.name] = local_allowed
            if local_allowed:
                out[local.name] = Candidate(local.name, local.name, "local", 0, ())
        for cloud in self.config.cloud.models:
            if self.policy is None:
                key = cloud.name
                mask[key] = access.blocked_by is None
                if mask[key]:
                    send = tuple(
                        i for i in uploadable(attachments, cloud.vision) if attachments[i].relevance >= MIN_RELEVANCE
                    )
                    out[key] = Candidate(key, cloud.name, "cloud", 1, send)
                continue
            allowed = action_mask(views, cloud_allowed=access.blocked_by is None, vision=cloud.vision).tolist()
            for action in range(1, N_ACTIONS):
                key = f"{cloud.name}|{ACTION_NAMES[action]}"
                mask[key] = allowed[action] > 0
                if mask[key]:
                    send = tuple(sorted(slots[k] for k in SUBSETS[action - 1]))
                    out[key] = Candidate(key, cloud.name, "cloud", action, send)
        for key in self._over_cap(turn, out, access):
            del out[key]
            mask[key] = False
        if not out:  # everything masked: the default local model still answers
            default = self.config.local.default
            out[default] = Candidate(default, default, "local", 0, ())
        return out, mask

    def _over_cap(self, turn: Turn, candidates: dict[str, Candidate], access: CloudAccess) -> list[str]:
        """Cloud actions that could take today's spend past the daily cap (prompt at 4 characters a token,
        the turn's max_tokens of answer, the images uploaded)."""
        if access.daily_cap_usd <= 0:
            return []
        left = access.daily_cap_usd - access.spent_today_usd
        answer = turn.request.options.max_tokens or self.config.local.max_tokens
        tokens_in = turn.prompt_tokens
        cloud = [c for c in candidates.values() if c.location == "cloud"]
        price = {c.key: self.config.cloud_model(c.model).price(tokens_in, answer, _images(turn, c)) for c in cloud}
        return [key for key, usd in price.items() if usd > left]

    def _policy_term(
        self,
        turn: Turn,
        snapshot: Snapshot,
        access: CloudAccess,
        views: list[Slot],
        candidates: dict[str, Candidate],
        s_hat: dict[str, float],
    ) -> PolicyTerm:
        """-w * log pi(action) per candidate from the ONNX policy; nothing when none is loaded."""
        if self.policy is None:
            return PolicyTerm({}, {}, None)
        best = {"local": 0.0, "cloud": 0.0}  # the best predicted satisfaction at each location
        for key, c in candidates.items():
            best[c.location] = max(best[c.location], s_hat[key])
        local_s, cloud_s = best["local"], best["cloud"]
        cap = self.config.cloud.daily_cap_usd
        money_left = 1.0 if cap <= 0 else max(0.0, 1 - access.spent_today_usd / cap)
        energy_left = (snapshot.battery_pct or 100) / 100 if snapshot.on_ac is False else 1.0
        inputs = ObsInputs(
            task=turn.task,
            prompt_chars=len(turn.request.prompt),
            slots=views,
            history=[PastTurn(t.location, t.slots_sent, t.task) for t in turn.session.trail[-Z:]],
            battery=None if snapshot.battery_pct is None else snapshot.battery_pct / 100,
            on_ac=snapshot.on_ac,
            power_w=snapshot.power_w,
            cpu_pct=snapshot.cpu_pct,
            online=snapshot.online,
            link=snapshot.link,
            upload_bps=snapshot.upload_bps,
            rtt_ms=snapshot.rtt_ms,
            budgets=(1.0, money_left, energy_left),
            q_norm=self.mess.state.q / max(self.mess.q_cap, 1e-9),
            s_local=local_s,
            s_cloud=cloud_s,
        )
        actions = {c.action for c in candidates.values()}
        mask = np.array([float(a in actions) for a in range(N_ACTIONS)], dtype=np.float32)
        try:
            log_pi = self.policy.log_probs(observe(inputs), mask).tolist()
        except PolicyError as exc:
            log.error("%s; deciding with MESS+ alone for this turn", exc.message)
            return PolicyTerm({}, {}, None)
        weight = self.config.routing.weight_policy
        extra = {key: -weight * log_pi[c.action] for key, c in candidates.items()}
        probabilities = {ACTION_NAMES[a]: round(math.exp(log_pi[a]), 5) for a in sorted(actions)}
        return PolicyTerm(extra, probabilities, self.policy.version)

    def _with_notes(self, decision: Decision, turn: Turn) -> Decision:
        note = withheld_note(turn.attachments, decision.send, decision.location)
        if not note:
            return decision
        return Decision(
            decision.location,
            decision.model,
            decision.send,
            f"{decision.reason}; {note}",
            decision.explored,
            decision.routing,
        )

    def features(self, turn: Turn, candidate: Candidate) -> TurnFeatures:
        """The turn as this candidate would answer it: the local model sees the documents but no image;
        a cloud model sees what is uploaded. What stays behind shows as ``withheld_relevance``."""
        local = candidate.location == "local"
        shown, best_shown, best_hidden, image = 0, 0.0, 0.0, False
        for i, a in enumerate(turn.attachments):  # one pass: this runs for every candidate of every turn
            if a.kind == "document" if local else i in candidate.send:
                shown += 1
                best_shown = a.relevance if a.relevance > best_shown else best_shown
                image = image or a.kind == "image"
            elif a.relevance > best_hidden:
                best_hidden = a.relevance
        trail = turn.session.trail
        return TurnFeatures(
            prompt=turn.request.prompt,
            task=turn.task,
            n_attachments=shown,
            max_relevance=best_shown,
            has_image=image,
            position=len(trail),
            prev_cloud=bool(trail) and trail[-1].location == "cloud",
            withheld_relevance=best_hidden,
        )

    def costs(self, turn: Turn, snapshot: Snapshot, candidates: dict[str, Candidate]) -> dict[str, float]:
        """Normalised cost per candidate (the most expensive is 1): money, and device energy (generation
        locally, the radio for uploads), weighted by routing.weight_money / weight_energy."""
        weights = self.config.routing
        prompt_tokens = turn.prompt_tokens
        raw: dict[str, float] = {}
        for key, c in candidates.items():
            if c.location == "local":
                joules = snapshot.joules_per_token or self.config.local_model(c.model).joules_per_token
                raw[key] = weights.weight_energy * joules * EXPECTED_ANSWER_TOKENS / ENERGY_REF_J
                continue
            usd = self.config.cloud_model(c.model).price(prompt_tokens, EXPECTED_ANSWER_TOKENS, _images(turn, c))
            upload = prompt_tokens * 4 + sum(turn.attachments[i].upload_bytes for i in c.send)
            joules = RADIO_W * upload / max(snapshot.upload_bps, 1.0)
            raw[key] = weights.weight_money * usd / MONEY_REF_USD + weights.weight_energy * joules / ENERGY_REF_J
        top = max(raw.values()) or 1.0
        return {key: value / top for key, value in raw.items()}

    # -- learning ------------------------------------------------------------------------------------

    def after_turn(self, decision_id: int, turn: Turn, decision: Decision, answer: str) -> None:
        """Settle the queue with the prediction for the model that answered (labels come later), and have
        an explored turn graded by the judge when one is configured."""
        s_hat, action = decision.routing.get("s_hat"), decision.routing.get("action")
        if not isinstance(s_hat, dict) or action not in s_hat:
            return  # a forced turn: not part of the SLA accounting
        with self._lock:
            self.mess.settle(decision_id, decision.model, float(s_hat[action]))
            self._save()
        if decision.explored and self.config.routing.judge and self.config.cloud.models:
            self._judge.submit(self._grade, decision_id, turn.request.prompt, answer)

    def _grade(self, decision_id: int, question: str, answer: str) -> None:
        """Ask the cloud model whether the answer satisfies; its verdict is a label with source `judge`."""
        messages: list[dict[str, object]] = [
            {"role": "system", "content": JUDGE_INSTRUCTIONS},
            {"role": "user", "content": f"Question: {question}\n\nAnswer: {answer}\n\nYES or NO?"},
        ]
        text = f"{JUDGE_INSTRUCTIONS}{question}{answer}"
        try:
            graded = self.cloud.generate(
                self.config.cloud.default,
                Prompt(messages, 4, 0.0, 0, lambda _: None),
                Upload(images=0, bytes=len(text.encode())),
            )
        except CloudError as exc:
            log.info("judge could not grade decision %d: %s", decision_id, exc.message)
            return
        self.records.add_cost(decision_id, graded.cost_usd)
        verdict = VERDICT.search(graded.text)
        if verdict is None:
            log.info("judge gave no verdict for decision %d: %r", decision_id, graded.text[:40])
            return
        try:
            self.feedback(decision_id, verdict.group(1).lower() == "yes", source="judge")
        except UnknownDecision:
            pass  # the user labelled it first: their label stands

    def feedback(self, decision_id: int, satisfied: bool, source: str) -> dict[str, Any]:
        row = self.records.label(decision_id, satisfied, source)
        features = row.get("features") or {}
        with self._lock:
            if "hashed" in features:
                self.mess.label(decision_id, row["model"], _vector_from_record(features), satisfied)
            else:
                self.mess.state.pending.pop(decision_id, None)
            self._save()
            q = self.mess.state.q
        return {"decision": decision_id, "satisfied": satisfied, "source": source, "q": q}

    def status(self) -> dict[str, Any]:
        with self._lock:
            state = self.mess.state
            attained = self.mess.attained
            return {
                "mode": self.config.routing.mode,
                "sla": self.mess.sla,
                "v": self.mess.v,
                "q": state.q,
                "turns": state.settled,
                "attained": None if attained is None else round(attained, 4),
                "explore_probability": round(self.mess.explore_probability, 4),
                "labels": dict(state.labels),
                "infeasible": self.mess.infeasible,
                "pending_labels": len(state.pending),
                "policy": self.policy.version if self.policy else None,
                "policy_error": self.policy_error,
            }

    def save(self) -> None:
        self._judge.shutdown(wait=True)
        with self._lock:
            self._save()

    def _save(self) -> None:
        """Persist the MESS+ state; a full or read-only disk is logged, never fatal to a turn (the state in
        memory stays right and is saved again on the next turn)."""
        try:
            self.mess.save()
            self._save_failed = False
        except OSError as exc:
            if not self._save_failed:
                log.error("cannot save the MESS+ state to %s: %s (will retry every turn)", self.mess.path, exc)
            self._save_failed = True


def _images(turn: Turn, candidate: Candidate) -> int:
    return sum(turn.attachments[i].kind == "image" for i in candidate.send)


def _vector_from_record(features: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    fields = {k: features[k] for k in TurnFeatures.__dataclass_fields__ if k in features and k != "prompt"}
    dense_idx, dense_val = vectorize(TurnFeatures(prompt="", **fields))
    hashed = features["hashed"]
    indices = np.array([int(i) for i in hashed] + [i for i in dense_idx if i >= HASH_DIM], dtype=np.int64)
    values = np.array([float(v) for v in hashed.values()] + [v for i, v in zip(dense_idx, dense_val) if i >= HASH_DIM])
    return indices, values
