"""One chat turn, start to end, in one direction:

    ChatRequest -> Turn (session history, attachments checked) -> Decision -> backend slot and fit
        -> record begun -> ``decision`` -> generate (``delta``...) [-> fall back: ``fallback``, local]
        [-> a local answer judged unsure: ``escalated``, cloud (``delta``...)] -> record finished
        -> session updated -> ``done`` -> learner settles [-> shadow lane, if cloud]

A turn is *accepted* when its ``decision`` frame is sent, which happens only after its record is committed;
from then on it ends with a completed record and a ``done`` or ``error`` frame, whatever happens, a bug
included. Anything refused before that (bad attachment, prompt longer than the context, storage down) gets
an ``error`` frame and writes nothing. A local turn's record is begun beside the reading of its prompt, and
its answer's first text waits for it (``Acceptance``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field

from locod.daemon import attachments as att
from locod.daemon import prompts
from locod.daemon.answer_digests import answer_digest, opening_digests, resent_digests
from locod.daemon.answer_grammar import answer_grammar
from locod.daemon.backends import Backend, Generation, Prompt, Sampling, Upload
from locod.daemon.cancel import check_cancelled
from locod.daemon.cloud import CloudBackend, Received, StreamCut
from locod.daemon.cloud_usage import estimated_input, message_tokens
from locod.daemon.config import Config
from locod.daemon.decider import Decider
from locod.daemon.decision import Decision, unsent_images, withheld_note
from locod.daemon.escalation import ConfidenceCheck
from locod.daemon.learner import Learner
from locod.daemon.local import LocalBackend
from locod.daemon.logs import Throttle
from locod.daemon.records import DecisionLog, DecisionRecord, JudgedAnswer, Outcome
from locod.daemon.reply import Reply
from locod.daemon.sessions import Session, SessionStore, TurnTrail, door_of
from locod.daemon.shadow import ShadowJob, ShadowLane, overlap_label
from locod.daemon.tallies import Held
from locod.daemon.telemetry import Snapshot
from locod.errors import AttachmentError, Busy, CloudError, LocodError, StorageError
from locod.policy.rule import estimate_tokens
from locod.policy.tasks import task_of
from locod.protocol import (
    ANSWERED,
    ChatRequest,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    ErrorFrame,
    EscalatedFrame,
    FallbackFrame,
    QueuedFrame,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    request: ChatRequest
    session: Session
    client: bytes
    task: str
    attachments: list[att.PreparedAttachment]
    # The configuration the turn runs under from its decision on: the decider's, read with the decision,
    # so a reload meanwhile cannot remove the model it chose (``TurnRunner.run``).
    config: Config
    # Indices into the request's messages of the client's history that are this daemon's own answers made
    # from private material (known by their digest in the decision log): withheld from a cloud model.
    sent_private: frozenset[int] = frozenset()
    # The device as the decision saw it (what its record shows): a local turn is recorded after its wait
    # for the model, when the sampler may have moved on.
    device: Snapshot = field(default_factory=Snapshot)
    # What its cloud call may cost, held against the daily cap from its decision (``Decider.decide``) until its
    # record's completion counts what it did cost (``DecisionLog.finish``), or it ends before it is accepted.
    held: Held | None = None
    # What is reckoned of the turn once, by name: the question's tokens, the text's bytes, and what a cloud
    # model is sent for an upload choice, by (send, doc_token_budget) (a decision prices each cloud action
    # several times: its cost, the cap's shield, the hold). One dict, which ``dataclasses.replace`` hands on
    # to the turn as decided (its config, device and hold: none of these is reckoned from them); a
    # cached_property was not handed on, and the decided turn estimated the question again.
    _reckoned: dict[object, int] = field(default_factory=dict, repr=False, compare=False)
    # ``prompt_tokens`` where the caller has estimated it already (``TurnRunner._assemble``, refusing an unfit
    # prompt before its attachments are prepared): not estimated again.
    prompt_estimate: InitVar[int | None] = None

    def __post_init__(self, prompt_estimate: int | None) -> None:
        if prompt_estimate is not None:
            self._reckoned["prompt_tokens"] = prompt_estimate

    def _once(self, key: object, reckon: Callable[[], int]) -> int:
        """What ``reckon`` gives, reckoned once a turn."""
        if key not in self._reckoned:
            self._reckoned[key] = reckon()
        return self._reckoned[key]

    @property
    def prompt_tokens(self) -> int:
        """The question's tokens as estimated from its text (``rule.estimate_tokens``), once a turn: the
        context checks and each pricing of a cloud action read it, and each estimate read the whole question
        again (~2 ms for 200k characters, several times a turn)."""
        return self._once("prompt_tokens", lambda: estimate_tokens(self.request.prompt))

    @property
    def text_bytes(self) -> int:
        """The UTF-8 bytes of what a model is sent: the session's history, then the request's messages (a
        client's own history too, as an HTTP client's new conversation sends it): what an upload is reckoned
        from (``upload_bytes``; counted as four characters a token, Chinese text was a third of its bytes); a
        cloud action is priced by what it is sent (``cloud_price``)."""
        return self._once("text_bytes", self._text_bytes)

    def _text_bytes(self) -> int:
        messages = (*self.session.messages, *self.request.messages)
        return sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages)

    @property
    def private_material(self) -> bool:
        """Whether a local answer to this turn is made from private material: a private attachment, or
        history holding an answer made from one. Such an answer never reaches a cloud model (nor the judge)."""
        return any(a.private for a in self.attachments) or self.session.withheld > 0 or bool(self.sent_private)

    def upload_bytes(self, send: tuple[int, ...]) -> int:
        """About what a cloud action uploading ``send`` sends: the text, and each attachment's share."""
        return self.text_bytes + sum(self.attachments[i].upload_bytes for i in send)

    def max_tokens(self) -> int:
        return self.request.options.max_tokens or self.config.local.max_tokens

    def cloud_price(self, config: Config, model: str, send: tuple[int, ...], answer_tokens: int) -> float:
        """What cloud ``model`` of ``config`` (the decider's, while it decides: the turn's own is set from it
        after) charges for this turn: what it is sent, estimated as its answer is priced without usage
        (``estimated_input``: the history and the question with the excerpts of the documents among ``send``;
        priced by its messages alone, a turn with a document passed the daily cap by up to ``doc_token_budget``
        tokens), the images among ``send``, ``answer_tokens``."""
        images = sum(self.attachments[i].kind == "image" for i in send)
        budget = config.attachments.doc_token_budget
        sent = self._once((send, budget), lambda: self._cloud_input(send, budget))
        return config.cloud_model(model).price(sent, answer_tokens, images)

    def _cloud_input(self, send: tuple[int, ...], doc_token_budget: int) -> int:
        """``estimated_input`` of what a cloud model is sent for ``send``; a question sent without excerpts is
        the prompt, whose estimate the turn has."""
        *earlier, question = prompts.cloud_text(self, send, doc_token_budget)
        text = question["content"]
        asked = self.prompt_tokens if text == self.request.prompt else estimate_tokens(text)
        return estimated_input(earlier) + message_tokens(asked)

    def most_spent(self, decision: Decision) -> float:
        """What a cloud call for ``decision`` may cost: the whole ``max_tokens`` of answer, the price the
        daily cap's shield admitted it at. Its record holds this until it is completed: a kill during the
        call (which the endpoint bills) must not take it off today's spend."""
        return self.cloud_price(self.config, decision.model, decision.send, self.max_tokens())


@dataclass(frozen=True)
class Ending:
    """How an accepted turn ended: what the record is completed with and the client told."""

    decision: Decision  # after a fallback, the local one
    generation: Generation
    outcome: str  # ok | fallback | escalated | error | cancelled
    error: str | None = None
    kind: str = "error"  # the error frame's kind and code, for an outcome that is not an answer
    code: str | None = None  # None: the outcome; a fallback's: the cloud failure's (the fallback frame's cause)
    judged: JudgedAnswer | None = None  # the local answer's confidence, where it was read
    uploaded: tuple[int, ...] = ()  # attachments a cloud attempt sent before the turn fell back

    @classmethod
    def failed(cls, decision: Decision, error: LocodError) -> Ending:
        return cls(decision, EMPTY, "error", error.message, type(error).code, error.code)

    @classmethod
    def internal(cls, decision: Decision, bug: Exception) -> Ending:
        return cls(decision, EMPTY, "error", f"internal error: {type(bug).__name__}", "error", "internal")


EMPTY = Generation("", 0, 0, None, 0.0)
# Outcomes answered by another action than the one the record was begun with (what its features describe).
HANDED_OVER = ("escalated", "fallback")


class Acceptance:
    """A turn's record being begun: committed, then the ``decision`` frame sent. No text of the answer
    leaves before it (``gate``), so accepted still means committed while the record commits beside the
    prompt's reading."""

    def __init__(self, begun: Future[int]) -> None:
        self.begun = begun

    @classmethod
    def of(cls, decision_id: int) -> Acceptance:
        """A record already begun."""
        begun: Future[int] = Future()
        begun.set_result(decision_id)
        return cls(begun)

    def decision_id(self) -> int:
        """The record's id, once committed; raises what refused the turn if it could not be begun."""
        return self.begun.result()

    def gate(self, prompt: Prompt) -> Prompt:
        """The prompt whose answer's text waits for the commit."""
        pass_on = prompt.on_delta

        def on_delta(text: str) -> None:
            self.begun.result()
            pass_on(text)

        return dataclasses.replace(prompt, on_delta=on_delta)


def _with_partial(generation: Generation, failure: CloudError) -> Generation:
    """A local answer after a cloud attempt the endpoint received counts what that attempt uploaded; after a
    cut stream it also pays for what the cloud streamed before the cut (real providers bill it), at the cut
    answer's price, an estimate unless the endpoint reported usage."""
    if not isinstance(failure, Received):
        return generation
    sent = dataclasses.replace(generation, images_sent=failure.upload.images, bytes_up=failure.upload.bytes)
    if not isinstance(failure, StreamCut):
        return sent
    partial = failure.partial
    return dataclasses.replace(
        sent, cost_usd=generation.cost_usd + partial.cost_usd, cost_estimated=partial.cost_estimated
    )


def _unseen(attachments: list[att.PreparedAttachment]) -> str:
    """What a fallback's message adds when the turn has images: the local model that answers instead cannot
    see them. The decision's notice was made for the cloud, or for a local answer an escalation dropped; a
    chat UI shows the fallback's message in its place (the HTTP door's first line)."""
    images = [a.name for a in attachments if a.kind == "image"]
    return f", by a model that cannot see images (not seen: {', '.join(images)})" if images else ""


def _uploaded(turn: Turn, decision: Decision, failure: CloudError) -> tuple[tuple[int, ...], str]:
    """The attachments a failed cloud attempt sent, and the words that tell the user (empty: none): the
    record's ``attachments_sent`` must not say nothing left the device when the endpoint received them."""
    if not isinstance(failure, Received) or not decision.send:
        return (), ""
    names = ", ".join(turn.attachments[i].name for i in decision.send)
    return decision.send, f"; {decision.model} had received {names}"


def _after(local: Generation, answer: Generation) -> Generation:
    """The answer to an escalated turn, timed and charged from the start of the local attempt: the user
    waited for both, and the device spent the local answer's energy."""
    first = None if answer.first_token_ms is None else answer.first_token_ms + local.total_ms
    return dataclasses.replace(
        answer,
        total_ms=answer.total_ms + local.total_ms,
        first_token_ms=first,
        energy_j=answer.energy_j + local.energy_j,
    )


def _outcome(turn: Turn, ending: Ending, private: bool) -> Outcome:
    """What the turn's record is completed with; a ``private`` answer (made from private material) with the
    digests it is known by again when a client sends it back; one another action answered than the record
    was begun with (an escalation, a fallback) with that action's features, which a label trains it on."""
    decision, g = ending.decision, ending.generation
    handed_over = decision.routing is not None and ending.outcome in HANDED_OVER
    return Outcome(
        outcome=ending.outcome,
        backend=decision.location,
        model=decision.model,
        tokens_in=g.tokens_in,
        tokens_out=g.tokens_out,
        images_sent=g.images_sent,
        bytes_up=g.bytes_up,
        latency_first_token_ms=g.first_token_ms,
        latency_total_ms=g.total_ms,
        cost_usd=g.cost_usd,
        cost_estimated=g.cost_estimated,
        energy_j=g.energy_j,
        error=ending.error,
        error_code=None if ending.error is None else ending.code or ending.outcome,
        attachments_sent=[turn.attachments[i].name for i in sorted({*decision.send, *ending.uploaded})],
        confidence=ending.judged,
        private_answer=answer_digest(g.text) if private and g.text.strip() else None,
        private_openings=opening_digests(g.text) if private else (),
        s_settled=decision.routing.s_hat_taken if decision.routing and ending.outcome in ANSWERED else None,
        features=decision.routing.features.to_json() if decision.routing and handed_over else None,
    )


class TurnRunner:
    def __init__(
        self,
        config: Config,
        sessions: SessionStore,
        local: LocalBackend,
        cloud: CloudBackend,
        records: DecisionLog,
        decider: Decider,
        learner: Learner,
        shadow: ShadowLane,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.local = local
        self.cloud = cloud
        self.records = records
        self.decider = decider
        self.learner = learner
        self.shadow = shadow
        # Commits a local turn's record while the turn's own thread reads its prompt; local turns take the
        # gate one at a time, so one thread serves them.
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="record")
        # A cloud that refuses every call (a 400 never opens its breaker) fails every turn sent to it: each
        # fallback is in the decision log; the log says each kind (model, code, HTTP status) once a minute.
        self._fallbacks = Throttle(log)

    def close(self) -> None:
        """After the last turn (the server's pool shut down): its records are committed by then."""
        self._recorder.shutdown(wait=True)

    def run(self, request: ChatRequest, client: bytes, reply: Reply) -> None:
        held: Held | None = None
        try:
            if not self._session_turn(request, client, reply):
                reply.send(ErrorFrame(Busy.code, "cancelled", reply.cancel_reason))
                return
            turn = self._assemble(request, client, reply)
            started = time.perf_counter()
            decision, config, device, held = self.decider.decide(turn)
            turn = dataclasses.replace(turn, config=config, device=device, held=held)
            withheld = prompts.withheld_history(turn)
            if withheld and decision.location == "cloud":
                decision = decision.noted(withheld, notice=withheld)
            self._answer(turn, decision, (time.perf_counter() - started) * 1000, reply)
        except LocodError as exc:
            reply.send(ErrorFrame.of(exc))
        except Exception as exc:  # a bug must cost one turn, never the daemon
            log.exception("turn %s failed", request.id)
            reply.send(ErrorFrame("error", "internal", f"internal error: {type(exc).__name__}"))
        finally:  # refused before it was accepted, or its completion never counted: no call is made now
            if held is not None:
                self.records.today.release(held)

    def _session_turn(self, request: ChatRequest, client: bytes, reply: Reply) -> bool:
        """Wait until the session's earlier turns have answered (a session's turns run in the order they
        arrived, each reading the history the one before it left); False if the client left first. A turn
        that asked for ``queued`` frames is told how many go first, as while it waits for the local model."""
        if request.session is None:
            return True
        on_wait = (lambda ahead: reply.send(QueuedFrame(ahead))) if request.options.queued else None
        return self.sessions.wait_turn(request.session, door_of(client), reply.answered, reply.cancelled, on_wait)

    def _assemble(self, request: ChatRequest, client: bytes, reply: Reply) -> Turn:
        """The turn with its attachments prepared; a prompt no model could hold is refused first, and a
        cancelled turn stops between attachments (and between a document's chunks)."""
        cancelled = reply.cancelled
        cfg = self.config.attachments
        if len(request.attachments) > cfg.max_count:
            raise AttachmentError(
                f"{len(request.attachments)} attachments, at most {cfg.max_count} allowed (attachments.max_count)",
                code="too_many_attachments",
            )
        prompt_tokens = estimate_tokens(request.prompt) if request.attachments else None
        if prompt_tokens is not None:
            self.decider.refuse_unfit(prompt_tokens)
        prompt_terms = att.terms(request.prompt)
        prepared = []
        for a in request.attachments:
            check_cancelled(cancelled)
            data = att.load_bytes(a, self.config.paths.allow_dirs, cfg.max_bytes)
            prepared.append(att.prepare(a, data, prompt_terms, cfg, cancelled))
        prepared = att.as_subjects(prepared)
        session = self.sessions.open(request.session, door_of(client), reply.answered)  # each door its own namespace
        return Turn(
            request,
            session,
            client,
            task_of(request.prompt),
            prepared,
            self.config,
            self._sent_private(request),
            prompt_estimate=prompt_tokens,
        )

    def _sent_private(self, request: ChatRequest) -> frozenset[int]:
        """Which messages of the client's own history are answers this daemon made from private material."""
        answers = {
            i: resent_digests(m["content"]) for i, m in enumerate(request.messages[:-1]) if m["role"] == "assistant"
        }
        known = self.records.private_answers([digest for digests in answers.values() for digest in digests])
        return frozenset(i for i, digests in answers.items() if known.intersection(digests))

    def _backend(self, location: str) -> Backend:
        return self.local if location == "local" else self.cloud

    # -- answering -----------------------------------------------------------------------------------

    def _answer(self, turn: Turn, decision: Decision, decide_ms: float, reply: Reply) -> None:
        backend = self._backend(decision.location)
        check = ConfidenceCheck.of(decision, turn.request.prompt, self.learner)  # a turn that may escalate
        waiting = time.perf_counter()
        on_wait = (lambda ahead: reply.send(QueuedFrame(ahead))) if turn.request.options.queued else None
        if decision.location == "local":  # a schema it cannot follow is refused before the turn waits for it
            answer_grammar(turn.request.options.response_format)  # built here, found built when it answers
        with backend.slot(turn.client, reply.cancelled, on_wait) as granted:
            if not granted:  # the client left, or the daemon is stopping: nothing was accepted
                reply.send(ErrorFrame(Busy.code, "cancelled", reply.cancel_reason))
                return
            queue_ms = (time.perf_counter() - waiting) * 1000  # behind other turns for the local model
            prompt = self._fitted(backend, turn, decision, reply, check)  # may refuse
            accepted = self._begin(turn, decision, (decide_ms, queue_ms), reply)
            ending = self._answered(accepted, turn, decision, backend, accepted.gate(prompt), reply)
            decision_id = accepted.decision_id()
        if check is not None and check.judged is not None:  # the local model is free again
            try:
                ending = self._judged(decision_id, turn, ending, check, reply)
            except Exception as exc:  # accepted turns end with a finished record, a bug included
                log.exception("turn %s failed after its local answer was judged", turn.request.id)
                ending = Ending.internal(ending.decision, exc)
        self._finish(decision_id, turn, ending, reply)

    def _begin(self, turn: Turn, decision: Decision, waited_ms: tuple[float, float], reply: Reply) -> Acceptance:
        """Begin the turn's record. A local turn's is committed by the recorder thread while this one reads
        the prompt (the fsync leaves the first token's path); a cloud turn's first, before anything is
        sent (and paid for)."""
        if decision.location == "local":
            return Acceptance(self._recorder.submit(self._accept, turn, decision, waited_ms, reply))
        return Acceptance.of(self._accept(turn, decision, waited_ms, reply))

    def _answered(
        self, accepted: Acceptance, turn: Turn, decision: Decision, backend: Backend, prompt: Prompt, reply: Reply
    ) -> Ending:
        """Generate; once the turn is accepted it ends with an ``Ending`` whatever happens, a bug included."""
        try:
            return self._generate(accepted, turn, decision, backend, prompt, reply)
        except Exception as exc:
            accepted.decision_id()  # no record begun: what stopped it refuses the turn (raised from here)
            if isinstance(exc, LocodError):
                return Ending.failed(decision, exc)
            log.exception("turn %s failed after it was accepted", turn.request.id)
            return Ending.internal(decision, exc)

    def _judged(self, decision_id: int, turn: Turn, ending: Ending, check: ConfidenceCheck, reply: Reply) -> Ending:
        """A local answer whose checkpoint ran: kept (the queue settles with its corrected s_hat), or dropped
        and the turn escalated to the cloud, which answers it from the start."""
        judged = check.judged
        assert judged is not None
        if not ending.generation.escalated:
            decision = ending.decision.answered(judged.s_answered, judged.explored)
            return dataclasses.replace(ending, decision=decision, judged=judged)
        local = ending.generation
        private = ", ".join(a.name for a in turn.attachments if a.private)
        kept = f"private, kept on device: {private}" if private else None  # the cloud answers without them
        why = "; ".join(filter(None, (check.why(), prompts.withheld_history(turn), kept)))
        decision = ending.decision.escalated(why, judged.explored)
        # the decision frame said what a local answer uploads (nothing): say what the cloud's will
        sent = ", ".join(turn.attachments[i].name for i in decision.send)
        told = f"{why}; {decision.model} receives {sent}" if sent else why
        if unsent := unsent_images(turn.attachments, decision.send):  # the local answer saw none either
            told += f"; not uploaded, so not seen: {unsent}"
        notice = withheld_note(turn.attachments, decision.send, "cloud")[1]  # the decision's was the local answer's
        try:  # kept now: the cloud phase may be cut by a kill, and the completion with it
            self.records.judged(decision_id, judged, turn.most_spent(decision))
        except StorageError as exc:  # the completion writes it (or holds it for a full disk) all the same
            log.warning("turn %s: %s", turn.request.id, exc.message)
        reply.send(EscalatedFrame(decision_id, decision.model, judged.s_answered, told, notice))
        held = None if local.cut else (judged, local)  # a whole answer: shown if the cloud fails
        try:
            prompt = self._fitted(self.cloud, turn, decision, reply, None)
            ending = self._generate(Acceptance.of(decision_id), turn, decision, self.cloud, prompt, reply, held)
        except LocodError as exc:
            ending = Ending.failed(decision, exc)
        if ending.outcome == "ok":
            ending = dataclasses.replace(ending, outcome="escalated")
            right = overlap_label(local.text, ending.generation.text)
            if right is not None:  # None: the cloud's answer has no words to grade the local one against
                judged = dataclasses.replace(judged, label=right)
                self.learner.local_label(judged.model, self.decider.local_features(turn), right, judged, shadow=False)
        judged = ending.judged or judged  # shown after all, if the cloud failed
        return dataclasses.replace(ending, generation=_after(local, ending.generation), judged=judged)

    def _generate(
        self,
        accepted: Acceptance,
        turn: Turn,
        decision: Decision,
        backend: Backend,
        prompt: Prompt,
        reply: Reply,
        held: tuple[JudgedAnswer, Generation] | None = None,
    ) -> Ending:
        """The backend's answer; when the cloud fails, the local model's instead, or, after an escalation
        that dropped a whole local answer (``held``, with its judgement), that answer."""
        started = time.perf_counter()
        if reply.cancelled.is_set():  # before the answer began (client gone, stop's grace over): nothing is asked
            return self._ended(decision, dataclasses.replace(EMPTY, cancelled=True), reply)
        try:
            return self._ended(decision, backend.generate(decision.model, prompt), reply)
        except CloudError as exc:
            status = exc.status if isinstance(exc, Received) else None  # a 401 is news after a loop of 400s
            self._fallbacks.say(
                f"{decision.model} {exc.code} {status}",
                logging.WARNING,
                "turn %s: %s; falling back to the local model",
                turn.request.id,
                exc.message,
            )
            decision_id = accepted.decision_id()
            if held is None:
                return self._fall_back(decision_id, turn, decision, exc, reply)
            waited_ms = (time.perf_counter() - started) * 1000
            return self._show_held(decision_id, turn, decision, exc, reply, held, waited_ms)

    def _show_held(
        self,
        decision_id: int,
        turn: Turn,
        decision: Decision,
        failure: CloudError,
        reply: Reply,
        held: tuple[JudgedAnswer, Generation],
        waited_ms: float,
    ) -> Ending:
        """The cloud failed after an escalation that dropped a whole local answer: that answer, unsure as it
        was, is shown rather than made again (the local attempt's time and energy are added by ``_after``).
        It settles with the s_hat its confidence gave, and a label for it trains the confidence head."""
        judged, answer = held
        local = decision.fallen_back(judged.model, failure.message, self.decider.local_features(turn))
        local = local.answered(judged.s_answered, False)
        uploaded, told = _uploaded(turn, decision, failure)
        message = f"the cloud answer failed ({failure.message}{told}); showing the local answer it was to replace"
        reply.send(FallbackFrame(decision_id, judged.model, failure.code, message + _unseen(turn.attachments)))
        if turn.request.options.stream:
            reply.send(DeltaFrame(answer.text))
        shown = Generation(
            answer.text, answer.tokens_in, answer.tokens_out, waited_ms, waited_ms, finish_reason=answer.finish_reason
        )
        kept = dataclasses.replace(judged, kept=True)
        shown = _with_partial(shown, failure)
        return Ending(local, shown, "fallback", failure.message, code=failure.code, judged=kept, uploaded=uploaded)

    def _fall_back(self, decision_id: int, turn: Turn, decision: Decision, failure: CloudError, reply: Reply) -> Ending:
        """The cloud failed: the default local model answers the same turn, under the same record."""
        local = decision.fallen_back(turn.config.local.default, failure.message, self.decider.local_features(turn))
        uploaded, told = _uploaded(turn, decision, failure)
        unanswered = _with_partial(EMPTY, failure)  # what the cloud attempt uploaded and was billed, answered or not
        with self.local.slot(turn.client, reply.cancelled) as granted:
            if not granted:
                return Ending(local, unanswered, "cancelled", reply.cancel_reason, Busy.code, uploaded=uploaded)
            try:
                prompt = self._fitted(self.local, turn, local, reply, None)
            except LocodError as exc:
                error = f"{failure.message}; local fallback failed: {exc.message}"
                # reported under the cloud's code: it failed first
                return Ending(local, unanswered, "error", error, CloudError.code, failure.code, uploaded=uploaded)
            message = f"the cloud answer failed ({failure.message}{told}); answering locally, from the start"
            reply.send(FallbackFrame(decision_id, local.model, failure.code, message + _unseen(turn.attachments)))
            ending = self._ended(local, _with_partial(self.local.generate(local.model, prompt), failure), reply)
        ending = dataclasses.replace(ending, uploaded=uploaded)
        return (
            ending
            if ending.outcome != "ok"
            else dataclasses.replace(ending, outcome="fallback", error=failure.message, code=failure.code)
        )

    @staticmethod
    def _ended(decision: Decision, generation: Generation, reply: Reply) -> Ending:
        if generation.cancelled:
            return Ending(decision, generation, "cancelled", reply.cancel_reason, Busy.code)
        return Ending(decision, generation, "ok")

    def _fitted(
        self, backend: Backend, turn: Turn, decision: Decision, reply: Reply, check: ConfidenceCheck | None
    ) -> Prompt:
        """The turn's prompt fitted to the model (``fit`` refuses what it cannot hold; a local model's
        document excerpts are cut until they fit, ``LocalQuestion.fitted``)."""
        if decision.location != "local":
            messages, upload = prompts.cloud_messages(turn, decision.send, turn.config.attachments.doc_token_budget)
            return backend.fit(decision.model, self._prompt(turn, messages, reply, check, upload))
        question = prompts.LocalQuestion.of(turn, turn.config.local_model(decision.model).n_ctx)
        return question.fitted(lambda messages: backend.fit(decision.model, self._prompt(turn, messages, reply, check)))

    @staticmethod
    def _prompt(
        turn: Turn,
        messages: list[dict[str, object]],
        reply: Reply,
        check: ConfidenceCheck | None,
        upload: Upload | None = None,
    ) -> Prompt:
        options = turn.request.options
        on_delta = (lambda text: reply.send(DeltaFrame(text))) if options.stream else (lambda text: None)
        prompt = Prompt(
            messages,
            turn.max_tokens(),
            options.temperature,
            options.seed,
            on_delta,
            reply.cancelled,
            # the local model starts from this dialogue's kept state; a one-off turn's is never kept
            session=turn.session.key if turn.request.session is not None else None,
            stop=options.stop,
            sampling=Sampling.of(options),
            response_format=options.response_format,
        )
        if check is not None:
            prompt = dataclasses.replace(prompt, checkpoint=check.checkpoint())
        return prompt if upload is None else dataclasses.replace(prompt, upload=upload)

    # -- records and frames --------------------------------------------------------------------------

    def _accept(self, turn: Turn, decision: Decision, waited_ms: tuple[float, float], reply: Reply) -> int:
        """Begin the turn's record (committed), then tell the client where it runs: it is accepted.
        ``waited_ms``: deciding, then waiting behind other turns for the model."""
        prompt, (decide_ms, queue_ms) = turn.request.prompt, waited_ms
        record = DecisionRecord(
            session=turn.session.id,
            turn=turn.session.turns,
            request_id=turn.request.id,
            prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(),
            prompt_chars=len(prompt),
            prompt=prompt if turn.config.log.prompts else None,
            task=turn.task,
            location=decision.location,
            model=decision.model,
            reason=decision.reason,
            attachments_offered=[a.summary() for a in turn.attachments],
            attachments_sent=[turn.attachments[i].name for i in decision.send],
            telemetry=turn.device.row,
            explored=decision.explored,
            latency_decide_ms=decide_ms,
            latency_queue_ms=round(queue_ms, 3),
            cost_usd=turn.most_spent(decision) if decision.location == "cloud" else None,
            routing=decision.routing,
        )
        decision_id = self.records.begin(record)
        reply.send(
            DecisionFrame(
                decision_id,
                decision.location,
                decision.model,
                decision.reason,
                record.attachments_sent,
                decision.explored,
                decision.notice,
            )
        )
        return decision_id

    def _finish(self, decision_id: int, turn: Turn, ending: Ending, reply: Reply) -> None:
        """Complete the record, then answer: ``done`` (and learn, after the reply) or ``error``."""
        decision, g = ending.decision, ending.generation
        private = decision.location == "local" and turn.private_material  # the cloud never saw private material
        answered = ending.outcome in ANSWERED
        if answered:  # the log takes a label once the record is complete: from then on it waits for the settling
            self.learner.will_settle(decision_id, decision)
        try:
            self.records.finish(decision_id, _outcome(turn, ending, private), turn.held)
        except Exception as exc:  # no done frame, no settling: a label sent once the record is written trains at once
            self.learner.wont_settle(decision_id)
            if not isinstance(exc, LocodError):
                raise
            reply.send(ErrorFrame.of(exc, decision_id))  # record_not_committed: an accepted turn's error names it
            return
        if not answered:
            code = ending.code or ending.outcome
            reply.send(ErrorFrame(ending.kind, code, ending.error or ending.outcome, decision_id))
            return
        routed_to_cloud = decision.location == "cloud" and ending.outcome != "escalated"  # escalated: graded already
        shadow = self._shadow_job(decision_id, turn, ending) if routed_to_cloud else None
        slots = tuple(i in decision.send for i in range(len(turn.attachments)))
        trail = TurnTrail(decision.location, slots, turn.task)
        self.sessions.record(turn.session, turn.request.messages, g.text, trail, private, turn.sent_private)
        reply.send(self._done(decision_id, turn, ending))
        self.learner.settle(decision_id, decision, turn.request.prompt, g.text, private)  # learning after the reply
        if shadow is not None:
            self.shadow.offer(shadow)

    def _shadow_job(self, decision_id: int, turn: Turn, ending: Ending) -> ShadowJob | None:
        """The local model's question for a cloud-answered turn, taken before the session records the
        answer (so the history is what it was), or None when the lane would not run it."""
        if not self.shadow.affordable():
            return None
        model = turn.config.local.default
        return ShadowJob(
            decision_id=decision_id,
            model=model,
            asked=prompts.LocalQuestion.of(turn, turn.config.local_model(model).n_ctx),
            max_tokens=turn.max_tokens(),
            reference=ending.generation.text,
            features=self.decider.local_features(turn),
            s_prompt=routing.s_hat.get(model) if (routing := ending.decision.routing) else None,
            private=turn.private_material,
            stop=turn.request.options.stop,
            response_format=turn.request.options.response_format,
        )

    @staticmethod
    def _done(decision_id: int, turn: Turn, ending: Ending) -> DoneFrame:
        decision, g = ending.decision, ending.generation
        return DoneFrame(
            decision=decision_id,
            session=turn.session.id,
            outcome=ending.outcome,
            location=decision.location,
            model=decision.model,
            tokens_in=g.tokens_in,
            tokens_out=g.tokens_out,
            cost_usd=g.cost_usd,
            latency_ms=round(g.total_ms, 2),
            first_token_ms=None if g.first_token_ms is None else round(g.first_token_ms, 2),
            text=None if turn.request.options.stream else g.text,
            cost_estimated=g.cost_estimated or None,
            finish_reason=g.finish_reason,
        )
