"""Answer locally, escalate if unsure: the checkpoint that reads the local answer's confidence.

The decider plans it (``Decision.escalation``: the cloud action an unsure answer gives way to, and
the numbers it is weighed by); the local backend holds the answer back until its first tokens are in
(``Checkpoint``); ``ConfidenceCheck.keep`` then reads their log-probs into the confidence features, and the
learner corrects the local model's s_hat with them and has the rule choose (``Learner.checkpoint``). The
features are taken over the first ``routing.escalate_tokens`` tokens and scaled to that many
(``confidence.judged``, which the prior's fit and the replay read a trace's answers with too: docs/routing.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from locod.daemon.backends import Checkpoint
from locod.daemon.decision import Decision, Escalation
from locod.daemon.learner import Learner
from locod.daemon.records import JudgedAnswer
from locod.policy import confidence


class ConfidenceCheck:
    """The checkpoint of one turn that may escalate, and its verdict once it has run."""

    def __init__(self, plan: Escalation, model: str, question: str, learner: Learner) -> None:
        self.plan, self.model, self.question, self.learner = plan, model, question, learner
        self.judged: JudgedAnswer | None = None

    @classmethod
    def of(cls, decision: Decision, question: str, learner: Learner) -> ConfidenceCheck | None:
        plan = decision.escalation
        return None if plan is None else cls(plan, decision.model, question, learner)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.plan.tokens, self.keep)

    def keep(self, tokens: Sequence[str], logprobs: Sequence[float]) -> bool:
        plan = self.plan
        features = confidence.judged(self.question, tokens, logprobs, plan.tokens)
        self.judged = self.learner.checkpoint(plan, self.model, features)
        return self.judged.kept

    def why(self) -> str:
        """The escalation, in words (the escalated frame's message and the record's reason)."""
        assert self.judged is not None
        plan = self.plan
        if self.judged.explored:
            return f"explored (MESS+ exploration turn at the answer's checkpoint); {plan.model} answers, from the start"
        return (
            f"the local answer was not sure enough ({self.judged.s_answered:.0%} likely good after reading its "
            f"confidence, {plan.model} {plan.s_cloud:.0%}); {plan.model} answers instead, from the start"
        )
