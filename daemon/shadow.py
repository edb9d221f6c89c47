"""Shadow answers: labels for the local model on exactly the turns where it would otherwise get none.

When a turn is answered in the cloud and the device can afford it (``routing.shadow``: ``ac`` while on
mains power or without a battery, ``always``, or ``off``), the local model answers the same prompt in the
background at the lowest priority: it takes the local model only when no client holds or waits for it, and
stops at its next token when one queues (the job is then dropped, never retried ahead of users). The cloud's
answer grades it (the judge when ``routing.judge`` is on, else word overlap with the cloud's answer; always
overlap for an answer made from private material, which must not reach the judge, a cloud model); the
grade trains the local model's predictor (and its confidence head, from the answer's log-probs) and is
recorded in the turn's row (column ``shadow``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from locod.daemon.backends import Generation, Prompt
from locod.daemon.config import Config
from locod.daemon.learner import PRIVATE_UNJUDGED, Learner
from locod.daemon.local import LocalBackend
from locod.daemon.prompts import LocalQuestion
from locod.daemon.records import DecisionLog, JudgedAnswer, ShadowResult
from locod.daemon.telemetry import TelemetrySampler
from locod.errors import LocodError
from locod.policy import confidence
from locod.policy.messplus import RecordedFeatures

log = logging.getLogger(__name__)

WORD = re.compile(r"\w+")
AGREEMENT = 0.5  # word-overlap F1 at which a local answer counts as the cloud's equal
QUEUE = 16  # jobs waiting; the oldest are dropped first (labels, not answers: losing some costs little)


@dataclass(frozen=True)
class ShadowJob:
    decision_id: int
    model: str  # the local model that answers
    asked: LocalQuestion  # what that model would have been asked
    max_tokens: int
    reference: str  # the cloud's answer
    features: RecordedFeatures  # of the local action: what the label trains
    s_prompt: float | None = None  # the local model's s_hat on the turn: with it, the confidence head trains too
    private: bool = False  # the local answer is made from private material: never sent to the judge
    stop: tuple[str, ...] = ()  # the turn's stop sequences: the local answer ends where the cloud's did
    response_format: dict[str, Any] | None = None  # and its JSON mode: the local answer is JSON as the cloud's was


def overlap_label(answer: str, reference: str) -> bool | None:
    """Whether a local answer is the cloud's equal by word overlap; None when the cloud's answer has no words
    to compare with (only punctuation or emoji): no label, rather than a bad one for any local answer."""
    if WORD.search(reference) is None:
        return None
    return agreement(answer, reference) >= AGREEMENT


def agreement(answer: str, reference: str) -> float:
    """Word-overlap F1 of two answers, normalised (case, punctuation): 1 when they say the same words. A
    short reference (a fact, a number, a choice) contained in the answer counts as agreement. The words in
    common are counted once each (a cloud answer of 100,000 different words, a long numbered list, cost
    each of them a count over both answers: a core's work for tens of minutes, an escalated turn's end waiting)."""
    a, r = WORD.findall(answer.lower()), WORD.findall(reference.lower())
    if not a or not r:
        return 0.0
    if len(r) <= 3 and f" {' '.join(r)} " in f" {' '.join(a)} ":
        return 1.0
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


class ShadowLane:
    def __init__(
        self, config: Config, local: LocalBackend, learner: Learner, records: DecisionLog, telemetry: TelemetrySampler
    ) -> None:
        self.config = config
        self.local = local
        self.learner = learner
        self.records = records
        self.telemetry = telemetry
        self._jobs: deque[ShadowJob] = deque(maxlen=QUEUE)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._preempted = threading.Event()  # the running job's: set when a client queues, or at close
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def affordable(self) -> bool:
        mode = self.config.routing.shadow
        return mode == "always" or (mode == "ac" and self.telemetry.snapshot().on_ac is not False)

    def offer(self, job: ShadowJob) -> None:
        if self.affordable():
            self._jobs.append(replace(job, asked=job.asked.kept()))  # here: after the turn's reply
            self._wake.set()

    def close(self) -> None:
        """Stop a shadow answer at its next token and wait for the thread: the models are closed next, and
        closing one that is still generating killed the daemon (SIGSEGV) instead of stopping it."""
        self._stop.set()
        self._preempted.set()
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while self._jobs and not self._stop.is_set():
                job = self._jobs.popleft()
                try:
                    self._shadow(job)
                except Exception:  # a failed shadow costs a label, never the daemon
                    log.exception("shadow answer for decision %d failed", job.decision_id)

    def _shadow(self, job: ShadowJob) -> None:
        judged = self.config.routing.judge and not job.private  # the judge never sees private material
        if WORD.search(job.reference) is None and not judged:  # nothing could grade its answer: none is made
            self._ungraded(job)
            return
        self._preempted = preempted = threading.Event()
        if self._stop.is_set():  # close() may have set the previous job's event
            return
        while not self._stop.is_set():
            with self.local.gate.idle_slot(preempted) as granted:
                if granted:
                    started = time.perf_counter()
                    try:
                        generation = self.local.generate(job.model, job.asked.fitted(self._fit(job, preempted)))
                    except LocodError as exc:
                        log.info("no shadow answer for decision %d: %s", job.decision_id, exc.message)
                        return
                    break
            time.sleep(0.2)  # the local model is busy with users: wait for it to be idle
        else:
            return
        if generation.cancelled:
            return  # a user queued: their turn first; this label is not worth delaying them
        graded = self._grade(job, generation.text)
        if graded is None:
            self._ungraded(job)
            return
        satisfied, grader = graded
        ms = (time.perf_counter() - started) * 1000
        result = ShadowResult(job.model, satisfied, grader, generation.tokens_out, round(ms, 1))
        self.records.shadow(job.decision_id, result)
        self.learner.local_label(job.model, job.features, satisfied, self._judged(job, generation), shadow=True)
        log.debug("shadow answer for decision %d: %s by %s", job.decision_id, satisfied, grader)

    def _fit(self, job: ShadowJob, preempted: threading.Event) -> Callable[[list[dict[str, object]]], Prompt]:
        """The shadow prompt of these messages, fitted: greedy, silent, stopped when a user queues, with the
        log-probs the confidence head learns from."""

        def fit(messages: list[dict[str, object]]) -> Prompt:
            prompt = Prompt(
                messages,
                job.max_tokens,
                0.0,
                0,
                lambda _: None,
                preempted,
                logprobs=True,
                stop=job.stop,
                response_format=job.response_format,
            )
            return self.local.fit(job.model, prompt)

        return fit

    def _judged(self, job: ShadowJob, generation: Generation) -> JudgedAnswer | None:
        """The shadow answer's confidence, read as a turn's checkpoint reads it: what its label trains."""
        if job.s_prompt is None or not generation.logprobs:
            return None
        budget = self.config.routing.escalate_tokens
        features = confidence.judged(job.asked.question, generation.tokens, generation.logprobs, budget)
        task = job.features.turn.task
        s_answered = self.learner.answered(job.model, job.s_prompt, features, task)
        return JudgedAnswer(job.model, features, job.s_prompt, s_answered, kept=False, task=task)

    @staticmethod
    def _ungraded(job: ShadowJob) -> None:
        log.info("no shadow label for decision %d: the cloud's answer has no words to compare with", job.decision_id)

    def _grade(self, job: ShadowJob, answer: str) -> tuple[bool, str] | None:
        """Graded by the judge when it is on (never an answer made from private material), else by overlap;
        None when neither can grade it."""
        if self.config.routing.judge and job.private:
            log.debug("shadow answer for decision %d graded by overlap: %s", job.decision_id, PRIVATE_UNJUDGED)
        elif self.config.routing.judge:
            verdict = self.learner.judge(job.asked.question, answer, job.decision_id)
            if verdict is not None:
                return verdict, "judge"
        satisfied = overlap_label(answer, job.reference)
        return None if satisfied is None else (satisfied, "overlap")
