"""Learning from turns: the one owner of MESS+ state and of every label source.

After a routed turn is answered its prediction settles the queue; labels come later, from the user
(``feedback``) or from the judge (a cloud model grading an explored turn), correct the queue and train the
predictor on the features the decision recorded. Shadow answers (daemon/shadow.py) label the local model on
cloud-answered turns, and an answer that escalated is graded against the cloud's: both train the local
model's predictor (and its confidence head, where the answer's log-probs were read) but never the queue.
The state is saved after each change: copied under ``lock``, written after it is let go (a decision waits on
no serialising nor fsync). The decider reads the state under ``lock`` and writes only what
MESS+'s ``choose`` counts (exploration step, price window); nothing else touches it.
"""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from locod.daemon.backends import Prompt, Upload
from locod.daemon.cloud import CloudBackend
from locod.daemon.config import Config
from locod.daemon.decision import Decision, Escalation
from locod.daemon.logs import Throttle
from locod.daemon.modelfile import resolve_path
from locod.daemon.records import CostHold, DecisionLog, JudgedAnswer, LabelTarget
from locod.errors import CloudError, StorageError, UnknownDecision
from locod.policy import rule
from locod.policy.messplus import DIM, MessPlus, MessPlusState, RecordedFeatures, StateCopy
from locod.policy.warmstart import USER_PRIORS, Prior, load_prior

log = logging.getLogger(__name__)

JUDGE_INSTRUCTIONS = (
    "You grade answers. Reply with exactly one word: YES if the answer correctly and helpfully answers the "
    "question, NO otherwise."
)
JUDGE_TOKENS = 4  # a one-word verdict
# A reasoning model (one that takes max_completion_tokens) spends its limit on reasoning first: 4 tokens left
# it no answer text at all, so the judge never graded. This leaves room for a short reasoning.
JUDGE_REASONING_TOKENS = 1024
MAX_EARLY = 1000  # labels held for turns not settled yet
# Gradings waiting for the judge: with a slow or failing cloud they pile up (memory), and a stop would run them all.
MAX_JUDGING = 32
VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
PRIVATE_UNJUDGED = "its answer was made from private material (a private attachment, or history made from one)"


class Learner:
    def __init__(self, config: Config, records: DecisionLog, cloud: CloudBackend) -> None:
        self.records = records
        self.cloud = cloud
        self.lock = threading.Lock()  # MESS+ state; the decider holds it for a whole decision
        self._judge = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self._closing = threading.Event()  # the grading under way leaves its cloud call (a stop waits on none)
        self._judging = threading.BoundedSemaphore(MAX_JUDGING)  # a slot per grading queued or running
        self._judge_full = Throttle(log)
        self._save_failed = False  # log a failing save once, not every turn
        self._write_lock = threading.Lock()  # one save written at a time, outside ``lock``
        self._copies = 0  # state copies taken (under ``lock``): each one's generation
        self._written = 0  # the newest generation written (under ``_write_lock``)
        # Routed turns whose record is complete and whose settling is still to come (learning runs after the
        # reply), and the labels that came meanwhile: applied when it settles, so that the label, not the
        # prediction, moves the queue. Any other turn's label trains at once: one settled in an earlier run,
        # or in this one whether or not MESS+ still holds its prediction (it keeps the last 10,000).
        self._settling: set[int] = set()
        self._early: dict[int, tuple[LabelTarget, bool]] = {}
        # A routed turn's record could not be completed (``wont_settle``): kept back, it may be written later,
        # answered and unsettled, so this run's stop cannot say the state holds every turn the log answered.
        self._unsettled_kept_back = False
        self.shadow_labels, self.escalated_labels = records.local_labels()
        self.found_priors: dict[str, Prior] = {}
        self.mess = self._take(config, self.priors(config), state=None)  # the state as its file holds it
        self._settle_missed_turns()
        self._learn_missed_labels()

    @staticmethod
    def priors(config: Config) -> dict[str, Prior]:
        """The predictor priors of the configured local models' GGUFs (policy/warmstart.py): the user's own
        (scripts/fit_prior.py, in the state directory), else the shipped one: a fresh install routes well
        from its first turn. Read before taking the lock: it hashes the files."""
        found = {}
        for m in config.local.models:
            gguf = resolve_path(m, config.models_dir)
            found[m.name] = load_prior(gguf, config.state_dir / USER_PRIORS, DIM) or load_prior(gguf, dim=DIM)
        return {name: prior for name, prior in found.items() if prior is not None}

    def adopt(self, config: Config, priors: dict[str, Prior]) -> None:
        """Take a reloaded config's MESS+ parameters, carrying on from the state in memory, which holds what
        saves a full or read-only disk refused. Call with ``lock`` held: the decider swaps its config and
        policy in the same step (Decider.reload)."""
        self.mess = self._take(config, priors, self.mess.state)

    def _take(self, config: Config, priors: dict[str, Prior], state: MessPlusState | None) -> MessPlus:
        """MESS+ with the config's parameters, from ``state`` (None: its file's), a local model that has no
        labels yet starting from its prior, and one whose file was replaced starting over."""
        routing = config.routing
        self.config = config
        before, self.found_priors = self.found_priors, priors
        mess = MessPlus(
            rule.priors((m.name for m in config.local.models), (m.name for m in config.cloud.models)),
            sla=routing.sla,
            v=routing.v,
            explore_c=routing.explore_c,
            q_cap=routing.q_cap,
            path=Path(config.paths.state_dir) / "messplus.npz",
            state=state,
        )
        newest = self.records.newest()
        change = mess.follow_log(self.records.identity(), newest)
        if change is not None and change.another:
            log.warning(
                "the decision log %s is not the one the MESS+ state was kept with (a new log, or another "
                "device's): its decision ids name other turns, so the state's are dropped and none of its turns "
                "is settled or learned as the state's own (its predictors and queue are kept)",
                self.records.path,
            )
        elif change is not None:
            log.warning(
                "the decision log's newest decision is %d, below the %d the MESS+ state was kept with: the log was "
                "restored from a backup or emptied, and gives the ids after %d to new turns; the state's decision "
                "ids after it are dropped (its predictors and queue are kept)",
                newest,
                change.known,
                newest,
            )
        if change is not None:  # or the next start would read them again and settle none of this log's turns
            self._write(self._copy(mess))  # a reload's under ``lock``: only when the log changed
        first_decision = newest + 1  # the first a replaced file may have answered
        for model in config.local.models:
            _start_over_if_replaced(mess, model.name, resolve_path(model, config.models_dir), first_decision)
        for name, prior in priors.items():
            was = before.get(name)
            # Said at start and when the prior changes: a model without labels would say it at every reload.
            if mess.warm_start(name, prior) and (was is None or was.source != prior.source):
                log.info("MESS+ predictor for %s starts from the prior fitted on %s", name, prior.source)
        return mess

    def _settle_missed_turns(self) -> None:
        """Settle the turns the log answered that the saved state never settled: a turn's completion is
        committed before its ``done``, its settling saved after, and a daemon killed between the two left the
        queue without it (its label, when it came, trained but moved nothing). The turns from the oldest
        the state knows it settled on are looked at, else those after the newest it was saved with (a clean
        stop's, or the log's newest when it took this log for its own, ``MessPlus.follow_log``); a state that
        knows neither (new, or older than the ids it keeps) has nothing to tell them apart by, and is left as
        it is. A state a clean stop saved after the log's newest turn missed none: the log is not read (up to
        11,000 rows)."""
        with self.lock:
            missed = self._missed_turns()
            for decision_id, model, s_settled in missed:
                self.mess.settle(decision_id, model, s_settled)
            saved = self._copy() if missed else None
        self._write(saved)
        if missed:
            log.info(
                "settled %d turn(s) the decision log answered before the last stop that the MESS+ state had "
                "not (decisions %s)",
                len(missed),
                ", ".join(str(decision_id) for decision_id, _, _ in missed),
            )

    def _missed_turns(self) -> list[tuple[int, str, float]]:
        """The turns ``_settle_missed_turns`` settles (called with ``lock`` held)."""
        state = self.mess.state
        stopped_at, state.stopped_at = state.stopped_at, None  # this run's saves are no clean stop's
        settled = state.settled_ids
        first = min(settled) if settled else None if stopped_at is None else stopped_at + 1
        if first is None or (stopped_at is not None and stopped_at == self.records.newest()):
            return []
        return [turn for turn in self.records.settled_since(first) if turn[0] not in settled]

    def _learn_missed_labels(self) -> None:
        """Learn the labels the log took for turns the saved state still waits on: a label is committed, then
        learned and the state saved, and a daemon killed between the two left it unlearned for good (sent
        again, it is refused as final)."""
        with self.lock:
            missed = self.records.labels_of(self.mess.state.pending)
            for labelled, satisfied in missed:
                self._apply_label(labelled.decision_id, labelled, satisfied)
            saved = self._copy() if missed else None
        self._write(saved)
        if missed:
            log.info(
                "learned %d label(s) the decision log took before the last stop that the MESS+ state had not "
                "(decisions %s)",
                len(missed),
                ", ".join(str(labelled.decision_id) for labelled, _ in missed),
            )

    def will_settle(self, decision_id: int, decision: Decision) -> None:
        """Before an answered turn's record is complete (the log takes a label from then on, and the client
        has the decision's id from its first frame): a label that comes before its settling waits for it."""
        if decision.routing is not None and decision.routing.s_hat_taken is not None:
            with self.lock:
                self._settling.add(decision_id)

    def wont_settle(self, decision_id: int) -> None:
        """The turn's record could not be completed: it is not settled, and its label trains when it comes."""
        with self.lock:
            if decision_id in self._settling:
                self._settling.discard(decision_id)
                self._unsettled_kept_back = True

    def settle(self, decision_id: int, decision: Decision, question: str, answer: str, private: bool = False) -> None:
        """Settle the queue with the prediction for what answered (labels come later), and have an explored
        turn graded by the judge when one is configured; never an answer made from private material
        (``private``), which the judge, a cloud model, must not see. A turn the rule did not route is not
        part of the SLA's accounting."""
        routing = decision.routing
        if routing is None or routing.s_hat_taken is None:
            return
        with self.lock:
            self._settling.discard(decision_id)
            self.mess.settle(decision_id, decision.model, routing.s_hat_taken)
            early = self._early.pop(decision_id, None)
            if early is not None:
                self._apply_label(decision_id, *early)
            saved = self._copy()
        self._write(saved)
        if decision.explored and self.config.routing.judge and self.config.cloud.models:
            if private:
                log.info("decision %d is not sent to the judge: %s", decision_id, PRIVATE_UNJUDGED)
                return
            if not self._judging.acquire(blocking=False):
                self._judge_full.say(
                    "full", logging.WARNING, "decision %d is not judged: %d gradings wait", decision_id, MAX_JUDGING
                )
                return
            grading = self._judge.submit(self._grade, decision_id, question, answer)
            grading.add_done_callback(partial(self._graded, decision_id))

    def feedback(self, decision_id: int, satisfied: bool, source: str) -> dict[str, Any]:
        labelled = self.records.label(decision_id, satisfied, source)  # refuses a turn still running
        with self.lock:
            if decision_id in self._settling:
                self._early[decision_id] = (labelled, satisfied)  # answered, not settled yet: at its settling
                while len(self._early) > MAX_EARLY:  # a turn whose settling never came (it failed on the way)
                    del self._early[next(iter(self._early))]
            else:
                self._apply_label(decision_id, labelled, satisfied)
            saved = self._copy()
            q, attained, sla = self.mess.state.q, self.mess.attained, self.mess.sla  # one MESS+: a reload replaces it
        self._write(saved)
        return {  # where the label leaves the satisfaction against the SLA: what its sender asks next
            "decision": decision_id,
            "satisfied": satisfied,
            "source": source,
            "routed": labelled.routing is not None,  # else forced or named: no part of the SLA, nor MESS+'s learning
            "q": q,
            "attained": None if attained is None else round(attained, 4),
            "sla": sla,
        }

    def _apply_label(self, decision_id: int, labelled: LabelTarget, satisfied: bool) -> None:
        """Train on a label and let it correct the queue (called with the lock held)."""
        if labelled.routing is not None:
            if not self.mess.label(decision_id, labelled.model, labelled.routing.features.vector(), satisfied):
                log.info(
                    "label for decision %d trains nothing: %s answered it from the file that name stood for before",
                    decision_id,
                    labelled.model,
                )
                return
            judged = labelled.confidence
            if judged is not None and judged.kept and judged.model == labelled.model:
                self._train_confidence(judged, satisfied)
        else:
            self.mess.state.pending.pop(decision_id, None)

    def checkpoint(self, plan: Escalation, model: str, features: tuple[float, ...]) -> JudgedAnswer:
        """At a local answer's checkpoint: whether to keep it, and its s_hat corrected by its confidence. The
        rule chooses now, between the answer (its cost spent) and the cloud action, exploration included;
        the price it sets from this choice sees the prediction the turn is settled with."""
        task = plan.features.turn.task
        with self.lock:
            s_answered = self.mess.confidence_head(model).predict(plan.s_prompt, features, task)
            model_of = {plan.local_key: model, plan.key: plan.model}
            keys = (plan.local_key, plan.key)
            choice = rule.keep_or_escalate(self.mess, keys, plan.margin, s_answered, plan.s_cloud, model_of)
        kept, s_rounded = choice.key == plan.local_key, round(s_answered, 5)
        return JudgedAnswer(model, features, plan.s_prompt, s_rounded, kept, task=task, explored=choice.explored)

    def answered(self, model: str, s_prompt: float, features: tuple[float, ...], task: str) -> float:
        """The local model's s_hat once it has answered: its prompt-only s_hat corrected by its confidence."""
        with self.lock:
            return self.mess.confidence_head(model).predict(s_prompt, features, task)

    def local_label(
        self, model: str, features: RecordedFeatures, satisfied: bool, judged: JudgedAnswer | None, shadow: bool
    ) -> None:
        """A label for a local answer the user never saw (a shadow answer, or one that escalated), graded
        against the cloud's: trains the local model's predictor and, where the answer's confidence was
        read, its confidence head. The queue is not moved: the cloud's answer is what the turn settled with."""
        with self.lock:
            self.mess.train(model, features.vector(), 1.0 if satisfied else 0.0)
            if judged is not None:
                self._train_confidence(judged, satisfied)
            self.shadow_labels += shadow
            self.escalated_labels += not shadow
            saved = self._copy()
        self._write(saved)

    def _train_confidence(self, judged: JudgedAnswer, satisfied: bool) -> None:
        self.mess.confidence_head(judged.model).train(judged.s_prompt, judged.features, judged.task, satisfied)

    def judge(self, question: str, answer: str, decision_id: int) -> bool | None:
        """The cloud model's verdict on an answer (its price added to the turn's cost); None if it gave none."""
        messages: list[dict[str, object]] = [
            {"role": "system", "content": JUDGE_INSTRUCTIONS},
            {"role": "user", "content": f"Question: {question}\n\nAnswer: {answer}\n\nYES or NO?"},
        ]
        text = f"{JUDGE_INSTRUCTIONS}{question}{answer}"
        model = next((m for m in self.config.cloud.models if m.name == self.config.cloud.default), None)
        if model is None:  # a reload removed the cloud models since the turn was answered
            log.info("judge could not grade decision %d: no cloud model is configured any more", decision_id)
            return None
        max_tokens = JUDGE_TOKENS if model.max_tokens_param == "max_tokens" else JUDGE_REASONING_TOKENS
        most = model.price(rule.estimate_tokens(text), max_tokens, 0)  # at its longest verdict
        with self.lock:  # the cap checked and held as one, as a turn's decision is (Decider.decide)
            if not self._within_cap(most):
                log.info("judge does not grade decision %d: it could pass today's cloud.daily_cap_usd", decision_id)
                return None
            held = self.records.today.hold(most)
        hold = self.records.hold_cost(decision_id, most, held)  # a kill during the call leaves it counted
        if hold.error is not None:
            said = "judge's cost for decision %d is not in its record during the call: %s"
            log.warning(said, decision_id, hold.error)
        try:
            upload = Upload(images=0, bytes=len(text.encode()))
            prompt = Prompt(messages, max_tokens, 0.0, 0, lambda _: None, self._closing, upload=upload)
            graded = self.cloud.generate(model.name, prompt)
        except CloudError as exc:
            self._settle_cost(decision_id, 0.0, hold)  # as before the hold: a failed call is not counted
            log.info("judge could not grade decision %d: %s", decision_id, exc.message)
            return None
        self._settle_cost(decision_id, graded.cost_usd, hold)
        if graded.cancelled:  # its cost is counted: the endpoint has the question, and may bill it
            log.info("judge did not grade decision %d: the daemon stopped during its call", decision_id)
            return None
        # One word was asked for: a reply that says both (the question's "YES or NO?" echoed before its
        # verdict, or text injected into the graded answer) grades nothing rather than by its first word.
        verdicts = {word.lower() for word in VERDICT.findall(graded.text)}
        if len(verdicts) != 1:
            log.info(
                "judge gave no verdict for decision %d (%d characters, %s)",
                decision_id,
                len(graded.text),
                "both yes and no" if verdicts else "neither yes nor no",
            )
            return None
        return verdicts.pop() == "yes"

    def _within_cap(self, most: float) -> bool:
        """Whether a grading that may cost ``most`` (at its longest verdict) fits what is left of today's daily
        cap: the cap keeps the cloud off for the judge as for turns, and a reasoning judge's verdict may take
        1,024 tokens."""
        cap = self.config.cloud.daily_cap_usd
        return cap <= 0 or most <= cap - self.records.committed_today()

    def _settle_cost(self, decision_id: int, usd: float, hold: CostHold) -> None:
        """What the judge's call did cost, in place of its hold; a write that fails is said (the verdict still
        counts, and today's spend has the money)."""
        try:
            self.records.add_cost(decision_id, usd, hold)
        except StorageError as exc:
            kept = "" if hold.error else f" (it keeps the most the call could cost, {hold.usd:.6f} USD)"
            log.warning("judge's cost for decision %d is not in its record%s: %s", decision_id, kept, exc.message)

    def _grade(self, decision_id: int, question: str, answer: str) -> None:
        """Have the judge grade an explored turn; its verdict is a label with source `judge`."""
        verdict = self.judge(question, answer, decision_id)
        if verdict is None:
            return
        try:
            self.feedback(decision_id, verdict, source="judge")
        except UnknownDecision:
            pass  # the user labelled it first: their label stands
        except StorageError as exc:  # on the judge's thread: unsaid, it would vanish without a word
            log.warning("judge's verdict for decision %d is not stored: %s", decision_id, exc.message)

    def _graded(self, decision_id: int, grading: Future[None]) -> None:
        """A grading's end: its place in the queue freed, and what it raised unforeseen logged (kept in its
        Future, which nobody reads, it vanished without a word); the daemon serves on."""
        self._judging.release()
        failed = None if grading.cancelled() else grading.exception()
        if failed is not None:
            log.error("judge's grading of decision %d failed", decision_id, exc_info=failed)

    def status(self) -> dict[str, Any]:
        with self.lock:
            state = self.mess.state
            attained = self.mess.attained
            return {
                "sla": self.mess.sla,
                "v": self.mess.v,
                "q": state.q,
                "turns": state.settled,
                "attained": None if attained is None else round(attained, 4),
                "explore_probability": round(self.mess.explore_probability, 4),
                "labels": dict(state.labels),
                "infeasible": self.mess.infeasible,
                "pending_labels": len(state.pending),
                "shadow_labels": self.shadow_labels,
                "escalated_labels": self.escalated_labels,
                "predictors": {m.name: self._predictor(m.name) for m in self.config.local.models},
            }

    def _predictor(self, model: str) -> dict[str, Any]:
        """Where a local model's predictor started (a prior for its GGUF, or the task priors) and how many
        labels it has learned from since: what `status` says of how well it may route yet."""
        prior = self.found_priors.get(model)
        return {
            "prior": None if prior is None else "shipped" if prior.shipped else str(prior.path),
            "fitted_on": None if prior is None else prior.source,
            "labels": self.mess.state.labels.get(model, 0),
        }

    def close(self) -> None:
        """End the grading under way and drop the queued ones (a stop must not wait on a slow cloud, once per
        explored turn: with an endpoint that says nothing, systemd's stop timeout killed the daemon before
        it saved), then save."""
        self._closing.set()
        self._judge.shutdown(wait=True, cancel_futures=True)
        with self.lock:
            self.mess.state.stopped_at = self._settled_through()
            saved = self._copy()
        self._write(saved)

    def _settled_through(self) -> int | None:
        """The log's newest decision id, when every turn the log answered is settled in the state (a stop's,
        after the last turn): else None, the next start reads the log for the turns to settle. Not when a
        turn's settling never came after its record was completed (a bug between the two), nor when a routed
        turn's record was kept back to be written later (a failing disk)."""
        if self._settling or self._unsettled_kept_back:
            return None
        try:
            return self.records.newest()
        except StorageError:
            return None

    def _copy(self, mess: MessPlus | None = None) -> _Save | None:
        """The state to save (``mess``'s, while it is being taken; else the learner's), copied with ``lock``
        held; ``_write`` writes it once the lock is let go: written under it, every decision waited for the
        serialising and two fsyncs of the save after the previous turn's reply."""
        copy = (mess or self.mess).snapshot()
        if copy is None:
            return None
        self._copies += 1
        return _Save(self._copies, copy)

    def _write(self, save: _Save | None) -> None:
        """Persist a state copy, unless a newer one was written meanwhile (two turns' saves may reach here in
        either order; the newer holds the older's change). A full or read-only disk is logged, never fatal
        to a turn (the state in memory stays right and is saved again on the next turn)."""
        if save is None:
            return
        with self._write_lock:
            if save.generation <= self._written:
                return
            try:
                save.copy.write()
            except OSError as exc:
                if not self._save_failed:
                    log.error("cannot save the MESS+ state to %s: %s (will retry every turn)", save.copy.path, exc)
                self._save_failed = True
                return
            self._written, self._save_failed = save.generation, False


@dataclass(frozen=True)
class _Save:
    """A state copy and its generation: the order the learner's changes were made in, under its lock."""

    generation: int
    copy: StateCopy


def _start_over_if_replaced(mess: MessPlus, model: str, gguf: Path, first_decision: int) -> None:
    """Start a local model's predictor over when its file is not the one it learned on, learning from the
    labels of ``first_decision`` on."""
    try:
        size = gguf.stat().st_size
    except OSError:  # not there or not readable: routing says so, once (daemon/modelfile.py)
        return
    learned_on = mess.start_over_if_replaced(model, size, first_decision)
    if learned_on is not None:
        log.warning(
            "local model %s is now %s (%d bytes), not the %d-byte file its predictor learned on: "
            "it starts over from its prior",
            model,
            gguf,
            size,
            learned_on,
        )
