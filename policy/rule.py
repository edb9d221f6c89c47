"""The routing rule, defined once for the daemon and for every evaluation of it.

Per turn, among the actions the masks left (each answered by one model, a cloud action with a choice of
attachments to upload), pick

    a* = argmin_a  V * (cost(a) + w * min(log(pi_best / pi(a)), ln 4)) + (Z' + V * mu) * (alpha - s_hat(a))

where s_hat comes from MESS+'s predictor over the features of what action a's model would see, Z' + V * mu
is MESS+'s price of satisfaction (its signed queue and feed-forward price: ``MessPlus.current_price``),
and log pi is the TMO policy's (absent without one). This module holds the rule's
constants (priors, cost scales, the relevance cut), the per-action features, the upload choice MESS+
makes without a policy, and the combination itself; daemon/decider.py and policy/evaluate.py both call it,
so an evaluation measures what the daemon runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from locod.policy.messplus import Choice, MessPlus, TurnFeatures
from locod.policy.observation import Slot

# Priors before any label: a small local model satisfies about half the time, a cloud model most of it.
LOCAL_PRIOR, CLOUD_PRIOR = 0.5, 0.85
# Cost scales: a tenth of a cent weighs as much as 1 kJ of device energy (about 0.3 Wh, under 1 % of a
# laptop battery); an upload's radio draws ~2 W.
MONEY_REF_USD, ENERGY_REF_J, RADIO_W = 0.001, 1000.0, 2.0
# The answer length a decision prices before the answer exists.
EXPECTED_ANSWER_TOKENS = 200
# Without a policy the cloud gets the uploadable attachments at least this relevant to the prompt.
MIN_RELEVANCE = 0.3
# ASCII digits and punctuation, a token each in the estimate: most tokenizers split numbers digit by digit,
# and code's symbols rarely merge with the words beside them.
_ASCII_SYMBOLS = re.compile(r"[0-9!-/:-@\[-`{-~]")
# The TMO policy's term counts an action's log-probability below the policy's favourite down to 1/4 of it.
POLICY_LOG_RATIO_CAP = math.log(4.0)


def estimate_tokens(text: str) -> int:
    """Tokens in ``text`` where no tokenizer is at hand (prices, the daily cap's hold, context checks, document
    budgets), rarely fewer than a real tokenizer counts, in any script: ASCII letters and spaces four to a
    token, ASCII digits and punctuation one each, every other character a token per two bytes of its UTF-8
    (Cyrillic or Arabic 1, Chinese, Japanese, Korean, Hindi or Thai 1.5) and one beyond the BMP (emoji) a
    token per byte. At four characters a token, Chinese was counted at a quarter of its tokens, Russian at
    half (docs/routing.md has the measurements)."""
    symbols = len(_ASCII_SYMBOLS.findall(text))
    if text.isascii():
        return (len(text) - symbols + 3) // 4 + symbols
    ascii_chars = len(text.encode("ascii", "ignore"))
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    astral = len(text.encode("utf-16-le", "surrogatepass")) // 2 - len(text)  # a surrogate pair each
    return (ascii_chars - symbols + 3) // 4 + symbols + (other_bytes + 1) // 2 + 2 * astral


def prefix_within(text: str, tokens: int) -> str:
    """The longest beginning of ``text`` that ``estimate_tokens`` counts at ``tokens`` or fewer."""
    low, high = 0, len(text)
    while low < high:  # the estimate never falls as text is added
        middle = (low + high + 1) // 2
        low, high = (middle, high) if estimate_tokens(text[:middle]) <= tokens else (low, middle - 1)
    return text[:low]


def priors(local: Iterable[str], cloud: Iterable[str]) -> dict[str, float]:
    """Every model's probability of satisfying before its first label."""
    return {**{name: LOCAL_PRIOR for name in local}, **{name: CLOUD_PRIOR for name in cloud}}


def action_features(
    prompt: str,
    task: str,
    attachments: Sequence[Slot],
    send: tuple[int, ...] | None,
    position: int = 0,
    prev_cloud: bool = False,
) -> TurnFeatures:
    """The turn as one action's model would see it: the local model (``send`` None) sees the documents but no
    image; a cloud model sees what is uploaded. What stays behind shows as ``withheld_relevance``.

    Predicting per action, not per model, is what lets MESS+ value an upload by the satisfaction it buys
    (docs/architecture.md)."""
    shown, best_shown, best_hidden, image = 0, 0.0, 0.0, False
    for i, a in enumerate(attachments):  # one pass: this runs for every candidate of every turn
        if (not a.image) if send is None else i in send:
            shown += 1
            best_shown = a.relevance if a.relevance > best_shown else best_shown
            image = image or a.image
        elif a.relevance > best_hidden:
            best_hidden = a.relevance
    return TurnFeatures(
        prompt=prompt,
        task=task,
        n_attachments=shown,
        max_relevance=best_shown,
        has_image=image,
        position=position,
        prev_cloud=prev_cloud,
        withheld_relevance=best_hidden,
    )


def relevant_uploads(attachments: Sequence[Slot], uploadable: Iterable[int]) -> tuple[int, ...]:
    """The one upload choice MESS+ alone is offered: the uploadable attachments relevant to the prompt. It has
    no term that would prefer one subset over another beyond cost, and its predictor starts knowing nothing."""
    return tuple(i for i in uploadable if attachments[i].relevance >= MIN_RELEVANCE)


def local_cost(joules_per_token: float, weight_energy: float) -> float:
    """A local answer's raw cost: device energy for the expected answer."""
    return weight_energy * joules_per_token * EXPECTED_ANSWER_TOKENS / ENERGY_REF_J


def cloud_cost(usd: float, upload_bytes: int, upload_bps: float, weight_money: float, weight_energy: float) -> float:
    """A cloud answer's raw cost: its price, and the radio's energy to upload the request."""
    joules = RADIO_W * upload_bytes / max(upload_bps, 1.0)
    return weight_money * usd / MONEY_REF_USD + weight_energy * joules / ENERGY_REF_J


def normalised(raw: Mapping[str, float]) -> dict[str, float]:
    """Costs over the dearest, so V weighs them on one scale whatever the prices."""
    top = max(raw.values()) or 1.0
    return {key: value / top for key, value in raw.items()}


def policy_terms(log_pi: Mapping[str, float] | None, weight: float) -> dict[str, float]:
    """Each action's policy term in cost units: ``weight * log(pi_best / pi(a))``, capped at
    ``weight * POLICY_LOG_RATIO_CAP``. A policy trained in simulation saturates (well under 1 % for whatever
    its environment never rewarded); uncapped, its term outweighed MESS+'s price of satisfaction on every
    turn, overshooting the SLA at twice MESS+'s spend (docs/evaluation.md). Capped, a sure policy adds at
    most weight * ln 4 (0.69 at the default weight) to an action it all but rules out, about two thirds of
    the dearest action's cost: it settles close calls and picks uploads; MESS+'s price settles the rest."""
    if not log_pi:
        return {}
    best = max(log_pi.values())
    return {key: weight * min(best - value, POLICY_LOG_RATIO_CAP) for key, value in log_pi.items()}


def choose(
    mess: MessPlus,
    costs: Mapping[str, float],
    s_hat: Mapping[str, float],
    model_of: Mapping[str, str],
    log_pi: Mapping[str, float] | None = None,
    weight: float = 0.0,
) -> Choice:
    """The combined rule over the unmasked actions: MESS+'s objective, plus each action's policy term
    (``policy_terms``) when a policy gave ``log_pi``. Exploration (MESS+'s p_t) is part of it."""
    extra = policy_terms(log_pi, weight)
    return mess.choose(dict(costs), s_hat=dict(s_hat), extra=extra, model_of=dict(model_of))


def keep_or_escalate(
    mess: MessPlus, keys: tuple[str, str], margin: float, s_answered: float, s_cloud: float, model_of: Mapping[str, str]
) -> Choice:
    """The rule at a local answer's checkpoint, between ``keys`` (the local action that answered, the cloud
    action): the answer at cost 0 (already spent) with its s_hat corrected by its confidence, or the cloud at
    ``margin`` (``escalates``), exploration included; the price window sees the prediction the turn settles with."""
    local, cloud = keys
    return mess.choose({local: 0.0, cloud: margin}, s_hat={local: s_answered, cloud: s_cloud}, model_of=dict(model_of))


def escalates(margin: float, price: float, s_cloud: float, s_local: float) -> bool:
    """Whether a turn the local model has answered (its answer's cost already spent) goes to the cloud as
    well: the same objective with the local cost at 0, so the cloud wins when what it costs beyond keeping
    the answer (``margin``: its cost and the policy's terms) is less than the satisfaction it adds at the
    SLA's current price. A high queue raises the price: more answers escalate."""
    return margin < price * (s_cloud - s_local)
