"""The decision engine: masks, then a fixed choice or MESS+ (with the TMO policy when one is loaded).

It owns the learned routing state: it builds a turn's features, asks MESS+ for the model, picks the
attachments to upload, settles the queue after the turn, and takes labels (user feedback or judge).
"""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from locod.daemon.attachments import PreparedAttachment
from locod.daemon.backends import Prompt
from locod.daemon.cloud import CloudBackend, Upload
from locod.daemon.config import Config
from locod.daemon.decide import CloudAccess, Decision, fixed_decision, uploadable, withheld_note
from locod.daemon.records import DecisionLog, local_midnight
from locod.daemon.telemetry import Snapshot, TelemetrySampler
from locod.policy.messplus import HASH_DIM, MessPlus, TurnFeatures, vectorize

from locod.errors import CloudError, UnknownDecision

if TYPE_CHECKING:
    from locod.daemon.turn import Turn

log = logging.getLogger(__name__)

# Priors before any label: a small local model satisfies about half the time, a cloud model most of it.
LOCAL_PRIOR, CLOUD_PRIOR = 0.5, 0.85
# Cost scales: money against a tenth of a cent, energy against 10 J; an upload's radio draws ~2 W.
MONEY_REF_USD, ENERGY_REF_J, RADIO_W = 0.001, 10.0, 2.0
EXPECTED_ANSWER_TOKENS = 200
MIN_RELEVANCE = 0.3
JUDGE_INSTRUCTIONS = (
    "You grade answers. Reply with exactly one word: YES if the answer correctly and helpfully answers the "
    "question, NO otherwise."
)
VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


class Router:
    def __init__(self, config: Config, records: DecisionLog, telemetry: TelemetrySampler, cloud: CloudBackend) -> None:
        self.records = records
        self.telemetry = telemetry
        self.cloud = cloud
        self._lock = threading.Lock()  # MESS+ state is shared by the turn threads
        self._judge = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.config = config
        routing = config.routing
        priors = {m.name: LOCAL_PRIOR for m in config.local.models}
        priors.update({m.name: CLOUD_PRIOR for m in config.cloud.models})
        with self._lock:
            self.mess = MessPlus(
                priors,
                sla=routing.sla,
                v=routing.v,
                explore_c=routing.explore_c,
                q_cap=routing.q_cap,
                path=Path(config.paths.state_dir) / "messplus.npz",
            )

    # -- deciding ------------------------------------------------------------------------------------

    def access(self, snapshot: Snapshot) -> CloudAccess:
        critical = (
            snapshot.battery_pct is not None
            and snapshot.on_ac is False
            and snapshot.battery_pct < self.config.routing.battery_critical_pct
        )
        return CloudAccess(
            configured=self.cloud.available,
            breaker_open=not self._breaker_allows(),
            online=snapshot.online,
            spent_today_usd=self.records.spent_since(local_midnight()),
            daily_cap_usd=self.config.cloud.daily_cap_usd,
            battery_critical=critical,
        )

    def _breaker_allows(self) -> bool:
        return self.cloud.breaker.state == "closed" or self.cloud.breaker.allow()

    def decide(self, turn: Turn) -> Decision:
        snapshot = self.telemetry.snapshot()
        access = self.access(snapshot)
        request = turn.request
        fixed = fixed_decision(self.config, request.options.force, request.model, turn.attachments, access)
        if fixed is not None:
            return self._with_notes(fixed, turn)
        features = self.features(turn)
        x = vectorize(features)
        costs, mask = self.costs(turn, snapshot, access)
        with self._lock:
            choice = self.mess.choose(x, costs)
            q, attained = self.mess.state.q, self.mess.attained
        location = "local" if any(m.name == choice.model for m in self.config.local.models) else "cloud"
        send = self._attachments_for(choice.model, turn.attachments) if location == "cloud" else ()
        why = (
            "explored (MESS+ exploration turn)"
            if choice.explored
            else (f"MESS+: lowest V*cost + Q*(alpha - s_hat) with Q={q:.2f}, s_hat={choice.s_hat[choice.model]:.2f}")
        )
        if access.blocked_by and location == "local":
            why += f"; cloud masked: {access.blocked_by}"
        routing = {
            "features": {
                **{k: v for k, v in vars(features).items() if k != "prompt"},
                "hashed": {int(i): round(float(v), 5) for i, v in zip(*x) if i < HASH_DIM},
            },
            "q": q,
            "sla": self.mess.sla,
            "v": self.mess.v,
            "s_hat": choice.s_hat,
            "costs": costs,
            "mask": mask,
            "attained": attained,
        }
        decision = Decision(location, choice.model, send, why, choice.explored, routing)
        return self._with_notes(decision, turn)

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

    def features(self, turn: Turn) -> TurnFeatures:
        relevance = [a.relevance for a in turn.attachments]
        trail = turn.session.trail
        return TurnFeatures(
            prompt=turn.request.prompt,
            task=turn.task,
            n_attachments=len(turn.attachments),
            max_relevance=max(relevance, default=0.0),
            has_image=any(a.kind == "image" for a in turn.attachments),
            position=len(trail),
            prev_cloud=bool(trail) and trail[-1].location == "cloud",
        )

    def costs(self, turn: Turn, snapshot: Snapshot, access: CloudAccess) -> tuple[dict[str, float], dict[str, bool]]:
        """Normalised cost per allowed model (the most expensive is 1), and the mask over all models."""
        weights = self.config.routing
        prompt_tokens = len(turn.request.prompt) // 4 + sum(len(m["content"]) // 4 for m in turn.session.messages)
        raw: dict[str, float] = {}
        mask: dict[str, bool] = {}
        for local in self.config.local.models:
            joules = snapshot.joules_per_token or local.joules_per_token
            allowed = not (access.battery_critical and access.blocked_by is None)
            mask[local.name] = allowed
            if allowed:
                raw[local.name] = weights.weight_energy * joules * EXPECTED_ANSWER_TOKENS / ENERGY_REF_J
        for cloud in self.config.cloud.models:
            mask[cloud.name] = access.blocked_by is None
            if not mask[cloud.name]:
                continue
            sent = [turn.attachments[i] for i in self._attachments_for(cloud.name, turn.attachments)]
            images = sum(a.kind == "image" for a in sent)
            usd = (
                prompt_tokens * cloud.usd_per_mtok_in + EXPECTED_ANSWER_TOKENS * cloud.usd_per_mtok_out
            ) / 1e6 + images * cloud.usd_per_image
            upload = prompt_tokens * 4 + sum(len(a.jpeg) for a in sent)
            joules = RADIO_W * upload / max(snapshot.upload_bps, 1.0)
            raw[cloud.name] = weights.weight_money * usd / MONEY_REF_USD + weights.weight_energy * joules / ENERGY_REF_J
        if not raw:  # everything masked: the default local model still answers
            raw[self.config.local.default] = 1.0
        top = max(raw.values()) or 1.0
        return {name: value / top for name, value in raw.items()}, mask

    def _attachments_for(self, model: str, attachments: list[PreparedAttachment]) -> tuple[int, ...]:
        vision = self.config.cloud_model(model).vision
        return tuple(i for i in uploadable(attachments, vision) if attachments[i].relevance >= MIN_RELEVANCE)

    # -- learning ------------------------------------------------------------------------------------

    def after_turn(self, decision_id: int, turn: Turn, decision: Decision, answer: str) -> None:
        """Settle the queue with the prediction for the model that answered (labels come later), and have
        an explored turn graded by the judge when one is configured."""
        s_hat = decision.routing.get("s_hat")
        if not isinstance(s_hat, dict) or decision.model not in s_hat:
            return  # a forced turn: not part of the SLA accounting
        with self._lock:
            self.mess.settle(decision_id, decision.model, float(s_hat[decision.model]))
            self.mess.save()
        if decision.explored and self.config.routing.judge and self.cloud.available:
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
            self.mess.save()
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
            }

    def save(self) -> None:
        self._judge.shutdown(wait=True)
        with self._lock:
            self.mess.save()


def _vector_from_record(features: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    fields = {k: features[k] for k in TurnFeatures.__dataclass_fields__ if k in features and k != "prompt"}
    dense_idx, dense_val = vectorize(TurnFeatures(prompt="", **fields))
    hashed = features["hashed"]
    indices = np.array([int(i) for i in hashed] + [i for i in dense_idx if i >= HASH_DIM], dtype=np.int64)
    values = np.array([float(v) for v in hashed.values()] + [v for i, v in zip(dense_idx, dense_val) if i >= HASH_DIM])
    return indices, values
