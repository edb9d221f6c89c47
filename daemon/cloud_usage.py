"""The token counts a cloud answer is priced by: the endpoint's ``usage`` when it is believable, else an estimate.

The OpenAI client does not validate ``usage``: a broken or hostile endpoint (or a proxy) can send null,
strings, lists, negative numbers, 1e308 or inf. Priced as they come, these fail the turn (TypeError), give a
negative cost that lifts the daily cap, or an infinite spend that masks the cloud for the day. So a count is
taken only when it is an integer (not a bool), non-negative and within what the request could have cost: an
input of at most one token per byte sent plus a template's overhead, an output of at most twice
``max_tokens`` (providers stop at ``max_tokens``; the slack is for counting differences). Otherwise both
counts are estimated from the text, as for an endpoint that reports no usage, and one warning per model
is logged. An estimated input counts each message's text as ``rule.estimate_tokens`` does (in any script:
at four characters a token, Chinese was a quarter of its tokens), plus the few tokens its role and
separators take: a one-word question is not a prompt of 0 tokens; only a message's text is counted (an
image is priced at ``usd_per_image``: counted as text, its data URL made one photo tens of thousands of
tokens). The daily cap holds a call at this estimate of what it is sent
(``estimated_input``), never below what its answer is priced at without usage. An estimated output is at
most ``max_tokens``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from locod.daemon.backends import Prompt
from locod.policy.rule import estimate_tokens

log = logging.getLogger(__name__)

OVERHEAD_TOKENS = 4096  # chat template, tool and system tokens a provider adds to what was sent
PER_MESSAGE_TOKENS = 3  # a message's role and separators, as OpenAI's chat format counts them
_warned: set[str] = set()
_warned_lock = threading.Lock()


def counted(model: str, usage: Any, prompt: Prompt, text: str, chunks: int) -> tuple[int, int, bool]:
    """(tokens_in, tokens_out, estimated) for an answer ``text`` of ``chunks`` deltas."""
    if usage is not None:
        tokens_in = getattr(usage, "prompt_tokens", None)
        tokens_out = getattr(usage, "completion_tokens", None)
        sent = max(prompt.upload.bytes, sum(len(text_of(m)) * 4 for m in prompt.messages))
        problem = _problem("prompt_tokens", tokens_in, sent + OVERHEAD_TOKENS) or _problem(
            "completion_tokens", tokens_out, 2 * prompt.max_tokens + 64
        )
        if problem is None:
            return int(tokens_in), int(tokens_out), False  # type: ignore[arg-type]
        _warn_once(model, problem)
    # no more than were asked for: the endpoint stopped there, and a client reads usage against max_tokens
    return estimated_input(prompt.messages), min(prompt.max_tokens, max(chunks, estimate_tokens(text))), True


def estimated_input(messages: Iterable[Mapping[str, object]]) -> int:
    """The prompt tokens of ``messages`` as estimated without usage: each one's text, and its role and
    separators."""
    return sum(message_tokens(estimate_tokens(text_of(m))) for m in messages)


def message_tokens(text_tokens: int) -> int:
    """A message's prompt tokens, of ``text_tokens`` of text: the one rule for what the daily cap holds for a
    call (``Turn.cloud_price``, whose question's text is estimated once a turn) and what its answer is priced
    at without usage, so the hold is never below the price."""
    return text_tokens + PER_MESSAGE_TOKENS


def text_of(message: Mapping[str, object]) -> str:
    """A message's text: its content, or the text parts of a content of parts (not an image's data URL)."""
    content = message.get("content", "")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _problem(field: str, value: Any, bound: int) -> str | None:
    if type(value) is not int:  # a bool is an int to Python, not a count
        return f"usage.{field} is {_shown(value)}, not an integer"
    if not 0 <= value <= bound:
        return f"usage.{field} is {_shown(value)}, outside 0..{bound} for this request"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _warn_once(model: str, problem: str) -> None:
    with _warned_lock:
        if model in _warned:
            return
        _warned.add(model)
    log.warning(
        "cloud model %s reported usage that cannot be right (%s): its answers are priced from their text "
        "instead (said once per model)",
        model,
        problem,
    )
