"""One chat turn, start to end, in one direction:

    request -> Turn (session history, attachments checked) -> Decision -> record begun -> backend (streamed)
            -> record finished -> session updated -> ``done``

A turn is *accepted* when its ``decision`` frame is sent, which happens only after its record is committed;
from then on it ends with a completed record and a ``done`` or ``error`` frame, whatever the backend does.
Anything rejected before that (bad attachment, prompt longer than the context, storage down) gets an
``error`` frame and writes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from locod.daemon import attachments as att
from locod.daemon.backends import Generation, Prompt
from locod.daemon.cloud import CloudBackend, Upload
from locod.daemon.config import Config
from locod.daemon.decide import Decision
from locod.daemon.features import task_of
from locod.daemon.gate import FairGate
from locod.daemon.local import LocalBackend
from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.sessions import Session, SessionStore, TurnTrail
from locod.errors import Busy, CloudError, LocodError
from locod.protocol import ChatRequest

log = logging.getLogger(__name__)

Send = Callable[..., None]


@dataclass
class Reply:
    """Frames for one request; ``cancelled`` is set when the client vanished or the daemon is stopping,
    ``answered`` once the last frame (``done`` or ``error``) has gone out."""

    post: Send  # post(type, **fields)
    cancelled: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "the client disconnected"

    def send(self, frame_type: str, **fields: Any) -> None:
        self.post(frame_type, **fields)
        if frame_type in ("done", "error"):
            self.answered.set()


@dataclass(frozen=True)
class Turn:
    request: ChatRequest
    session: Session
    client: bytes
    task: str
    attachments: list[att.PreparedAttachment]

    @functools.cached_property
    def prompt_tokens(self) -> int:
        """The prompt with its session history at 4 characters a token: the router's price estimate."""
        return len(self.request.prompt) // 4 + sum(len(m["content"]) // 4 for m in self.session.messages)


class TurnRunner:
    def __init__(
        self,
        config: Config,
        sessions: SessionStore,
        local: LocalBackend,
        cloud: CloudBackend,
        records: DecisionLog,
        gate: FairGate,
        decide: Callable[[Turn], Decision],
        snapshot: Callable[[], dict[str, Any]],
        on_finished: Callable[[int, Turn, Decision, str], None],
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.local = local
        self.cloud = cloud
        self.records = records
        self.gate = gate
        self.decide = decide
        self.snapshot = snapshot
        self.on_finished = on_finished

    def run(self, request: ChatRequest, client: bytes, reply: Reply) -> None:
        try:
            turn = self._assemble(request, client)
            started = time.perf_counter()
            decision = self.decide(turn)
            decide_ms = (time.perf_counter() - started) * 1000
            if decision.location == "local":
                self._answer_locally(turn, decision, decide_ms, reply)
            else:
                self._answer_in_cloud(turn, decision, decide_ms, reply)
        except LocodError as exc:
            reply.send("error", kind=type(exc).code, code=exc.code, message=exc.message)
        except Exception as exc:  # a bug must cost one turn, never the daemon
            log.exception("turn %s failed", request.id)
            reply.send("error", kind="error", code="internal", message=f"internal error: {type(exc).__name__}")

    def _assemble(self, request: ChatRequest, client: bytes) -> Turn:
        cfg = self.config.attachments
        if len(request.attachments) > cfg.max_count:
            raise att.AttachmentError(
                f"{len(request.attachments)} attachments, at most {cfg.max_count} allowed", code="too_many_attachments"
            )
        prompt_terms = att.terms(request.prompt)
        prepared = [
            att.prepare(a, att.load_bytes(a, self.config.paths.allow_dirs, cfg.max_bytes), prompt_terms, cfg)
            for a in request.attachments
        ]
        session = self.sessions.open(request.session)
        return Turn(request, session, client, task_of(request.prompt), prepared)

    # -- the two ways a turn is answered -------------------------------------------------------------

    def _answer_locally(
        self,
        turn: Turn,
        decision: Decision,
        decide_ms: float,
        reply: Reply,
        after_cloud: tuple[int, CloudError] | None = None,
    ) -> None:
        """Answer with the local model; ``after_cloud`` is (record id, failure) when falling back."""
        with self.gate.slot(turn.client, reply.cancelled) as granted:
            if not granted:
                if after_cloud is not None:
                    self._finish(after_cloud[0], turn, decision, None, "cancelled", reply, reply.cancel_reason)
                return
            messages = self._local_messages(turn, decision.model)
            try:
                local_prompt = self.local.prepare(decision.model, messages, self._max_tokens(turn))
            except LocodError as exc:
                if after_cloud is None:
                    raise  # rejected before acceptance: nothing recorded
                self._finish(
                    after_cloud[0],
                    turn,
                    decision,
                    None,
                    "error",
                    reply,
                    f"{after_cloud[1].message}; local fallback failed: {exc.message}",
                )
                return
            if after_cloud is None:
                decision_id = self._begin(turn, decision, decide_ms, reply)
            else:
                decision_id = after_cloud[0]
                reply.send(
                    "fallback",
                    decision=decision_id,
                    model=decision.model,
                    cause=after_cloud[1].code,
                    message=f"the cloud answer failed ({after_cloud[1].message}); answering locally",
                )
            generation = self.local.generate(local_prompt, self._prompt(turn, [], reply))
        outcome = "fallback" if after_cloud else "ok"
        self._finish(
            decision_id, turn, decision, generation, outcome, reply, after_cloud[1].message if after_cloud else None
        )

    def _answer_in_cloud(self, turn: Turn, decision: Decision, decide_ms: float, reply: Reply) -> None:
        decision_id = self._begin(turn, decision, decide_ms, reply)
        messages, upload = self._cloud_messages(turn, decision.send)
        try:
            generation = self.cloud.generate(decision.model, self._prompt(turn, messages, reply), upload)
        except CloudError as exc:
            log.warning("turn %s: %s; falling back to the local model", turn.request.id, exc.message)
            default = self.config.local.default
            # The routing state goes along: the turn still counts for the SLA (with the local model's
            # prediction) and an explored turn is still graded.
            local = Decision(
                "local",
                default,
                (),
                f"{decision.reason}; fell back: {exc.message}",
                decision.explored,
                {**decision.routing, "action": default},
            )
            self._answer_locally(turn, local, decide_ms, reply, after_cloud=(decision_id, exc))
            return
        self._finish(decision_id, turn, decision, generation, "ok", reply, None)

    # -- records and frames --------------------------------------------------------------------------

    def _begin(self, turn: Turn, decision: Decision, decide_ms: float, reply: Reply) -> int:
        prompt = turn.request.prompt
        routing: dict[str, Any] = decision.routing
        record = DecisionRecord(
            session=turn.session.id,
            turn=turn.session.turns,
            request_id=turn.request.id,
            prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(),
            prompt_chars=len(prompt),
            prompt=prompt if self.config.log.prompts else None,
            task=turn.task,
            location=decision.location,
            model=decision.model,
            reason=decision.reason,
            attachments_offered=[a.summary() for a in turn.attachments],
            attachments_sent=[turn.attachments[i].name for i in decision.send],
            telemetry=self.snapshot(),
            explored=decision.explored,
            latency_decide_ms=decide_ms,
            features=routing.get("features", {}),
            policy_version=routing.get("policy_version"),
            q=routing.get("q"),
            sla=routing.get("sla"),
            v=routing.get("v"),
            s_hat=routing.get("s_hat", {}),
            costs=routing.get("costs", {}),
            probabilities=routing.get("probabilities", {}),
            mask=routing.get("mask", {}),
        )
        decision_id = self.records.begin(record)
        reply.send(
            "decision",
            decision=decision_id,
            location=decision.location,
            model=decision.model,
            reason=decision.reason,
            attachments_sent=record.attachments_sent,
            explored=decision.explored,
        )
        return decision_id

    def _finish(
        self,
        decision_id: int,
        turn: Turn,
        decision: Decision,
        generation: Generation | None,
        outcome: str,
        reply: Reply,
        error: str | None,
    ) -> None:
        if generation is not None and generation.cancelled:
            outcome, error = "cancelled", reply.cancel_reason
        g = generation or Generation("", 0, 0, None, 0.0)
        sent = [turn.attachments[i].name for i in decision.send]
        self.records.finish(
            decision_id,
            Outcome(
                outcome=outcome,
                backend=decision.location,
                model=decision.model,
                tokens_in=g.tokens_in,
                tokens_out=g.tokens_out,
                images_sent=g.images_sent,
                bytes_up=g.bytes_up,
                latency_first_token_ms=g.first_token_ms,
                latency_total_ms=g.total_ms,
                cost_usd=g.cost_usd,
                energy_j=g.energy_j,
                error=error,
                attachments_sent=sent,
            ),
        )
        if outcome in ("ok", "fallback"):
            slots = tuple(i in decision.send for i in range(len(turn.attachments)))
            self.sessions.record(
                turn.session, [turn.request.messages[-1]], g.text, TurnTrail(decision.location, slots, turn.task)
            )
            done: dict[str, Any] = dict(
                decision=decision_id,
                session=turn.session.id,
                outcome=outcome,
                location=decision.location,
                model=decision.model,
                tokens_in=g.tokens_in,
                tokens_out=g.tokens_out,
                cost_usd=g.cost_usd,
                latency_ms=round(g.total_ms, 2),
                first_token_ms=g.first_token_ms,
            )
            if not turn.request.options.stream:
                done["text"] = g.text
            reply.send("done", **done)
            self.on_finished(decision_id, turn, decision, g.text)  # learning happens after the reply
        else:
            reply.send(
                "error",
                kind=Busy.code if outcome == "cancelled" else CloudError.code,
                code=outcome,
                message=error or outcome,
                decision=decision_id,
            )

    # -- what each backend is sent -------------------------------------------------------------------

    def _max_tokens(self, turn: Turn) -> int:
        return turn.request.options.max_tokens or self.config.local.max_tokens

    def _prompt(self, turn: Turn, messages: list[dict[str, object]], reply: Reply) -> Prompt:
        options = turn.request.options
        on_delta = (lambda text: reply.send("delta", text=text)) if options.stream else (lambda text: None)
        return Prompt(messages, self._max_tokens(turn), options.temperature, options.seed, on_delta, reply.cancelled)

    def _history(self, turn: Turn) -> list[dict[str, str]]:
        """The session's earlier messages, then this request's own (all but its last user message)."""
        return [*turn.session.messages, *turn.request.messages[:-1]]

    def _documents_text(self, turn: Turn, indices: list[int], token_budget: int) -> str:
        parts = []
        docs = [turn.attachments[i] for i in indices if turn.attachments[i].kind == "document"]
        for doc in docs:
            chunks = att.select_chunks(doc, token_budget // max(1, len(docs)))
            excerpt = "\n[...]\n".join(c.text for c in chunks)
            parts.append(f"Document {doc.name!r} (relevant excerpts):\n{excerpt}")
        return "\n\n".join(parts)

    def _local_messages(self, turn: Turn, model: str) -> list[dict[str, str]]:
        """Documents stay on the device, so the local model sees their best chunks (within a third of its
        context); images it cannot see."""
        n_ctx = self.config.local_model(model).n_ctx
        docs = self._documents_text(turn, list(range(len(turn.attachments))), n_ctx // 3)
        question = turn.request.prompt
        content = f"{docs}\n\n{question}" if docs else question
        return [*self._history(turn), {"role": "user", "content": content}]

    def _cloud_messages(self, turn: Turn, send: tuple[int, ...]) -> tuple[list[dict[str, object]], Upload]:
        docs = self._documents_text(turn, list(send), self.config.attachments.doc_token_budget)
        text = f"{docs}\n\n{turn.request.prompt}" if docs else turn.request.prompt
        parts: list[dict[str, object]] = [{"type": "text", "text": text}]
        images = [turn.attachments[i] for i in send if turn.attachments[i].kind == "image"]
        for image in images:
            parts.append({"type": "image_url", "image_url": {"url": att.data_url(image.jpeg)}})
        content: object = parts if images else text
        history: list[dict[str, object]] = [dict(m) for m in self._history(turn)]
        messages = [*history, {"role": "user", "content": content}]
        upload_bytes = len(text.encode()) + sum(len(i.jpeg) * 4 // 3 for i in images)
        return messages, Upload(images=len(images), bytes=upload_bytes)
