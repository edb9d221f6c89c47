"""Fitting a dialogue into a local model's context: the trimming rule docs/configuration.md states.

System messages and the newest user message always stay, the answer gets up to ``max_tokens``, older
messages go oldest first, and kept history starts at a user message. Tokenising costs about a second per
megabyte, in the first token's path, so what fits by its size alone is not tokenised, and what could not
fit even at the vocabulary's longest token is refused unread.
"""

from __future__ import annotations

import weakref
from typing import cast

from llama_cpp import Llama

from locod.daemon.backends import Prompt
from locod.errors import PromptTooLong

# Tokens the chat template adds around each message (role markers), and room it may add for a system prompt.
PER_MESSAGE_TOKENS = 6
TEMPLATE_SLACK_TOKENS = 32
MIN_ANSWER_TOKENS = 16
# Vocabularies (GGUF ``tokenizer.ggml.model``) where every token of plain text stands for at least one of its
# bytes, but for the one space SentencePiece ("llama") may put in front: a text has at most bytes + 1 tokens.
BYTE_BOUNDED_VOCABS = ("gpt2", "llama")


_longest: weakref.WeakKeyDictionary[Llama, int] = weakref.WeakKeyDictionary()


def longest_token_bytes(llm: Llama) -> int:
    """The most bytes one token of the model's vocabulary stands for (read once per loaded model)."""
    if llm not in _longest:
        _longest[llm] = max(len(llm.detokenize([i], special=True)) for i in range(llm.n_vocab())) or 1
    return _longest[llm]


def fit_to_context(
    llm: Llama, messages: list[dict[str, str]], max_tokens: int
) -> tuple[list[dict[str, str]], int | None, int]:
    """``trim_to_context``, but messages that fit by their size alone are not tokenised (about a second per
    megabyte, in the first token's path): they are kept whole, their prompt tokens None (``prompt_tokens``
    counts them once the answer is out)."""
    if fits_by_size(llm, messages, max_tokens):
        return _from_a_user(*_split(messages)), None, max_tokens
    return trim_to_context(llm, messages, max_tokens)


def trim_to_context(
    llm: Llama, messages: list[dict[str, str]], max_tokens: int
) -> tuple[list[dict[str, str]], int, int]:
    """Trim history to the context window; returns (messages, prompt tokens, answer budget).

    The rule: system messages and the newest user message always stay; the answer gets up to
    ``max_tokens``; older messages are dropped oldest first until the rest fits, and kept history
    starts at a user message. A newest message that leaves no room for ``MIN_ANSWER_TOKENS`` is an error.
    """
    system, history, last = _split(messages)
    n_ctx = llm.n_ctx()
    # Tokenising costs about a second per megabyte: text longer than the context could hold at the longest
    # token the vocabulary has is refused (or dropped from history) by its size alone, unread.
    most_bytes = n_ctx * longest_token_bytes(llm)

    def cost(message: dict[str, str]) -> int:
        return n_ctx + 1 if len(message["content"].encode()) > most_bytes else _message_tokens(llm, message)

    # OpenAI's words for it, which clients match to trim or reroute (LiteLLM's ContextWindowExceededError)
    limit = f"this model's maximum context length is {n_ctx} tokens"
    size = len(last["content"].encode())
    if size > most_bytes:
        raise PromptTooLong(f"the prompt is {size} bytes; {limit}, which hold at most {most_bytes} bytes of it")
    fixed = TEMPLATE_SLACK_TOKENS + sum(cost(m) for m in system) + cost(last)
    if fixed + MIN_ANSWER_TOKENS > n_ctx:
        raise PromptTooLong(f"the prompt needs about {fixed} tokens; {limit}")
    answer = min(max_tokens, n_ctx - fixed)
    room = n_ctx - fixed - answer
    newest_first: list[dict[str, str]] = []  # appended, then turned once: inserting each at the front was quadratic
    for message in reversed(history):
        room -= cost(message)
        if room < 0:
            break
        newest_first.append(message)
    fitted = _from_a_user(system, newest_first[::-1], last)
    return fitted, fixed + sum(cost(m) for m in fitted[len(system) : -1]), answer


def fits_by_size(llm: Llama, messages: list[dict[str, str]], max_tokens: int) -> bool:
    """Whether the messages and the whole answer budget fit the context counting each byte as a token (the
    most a text can have in a vocabulary of ``BYTE_BOUNDED_VOCABS``): then tokenising would trim nothing."""
    if llm.metadata.get("tokenizer.ggml.model") not in BYTE_BOUNDED_VOCABS:
        return False
    most = TEMPLATE_SLACK_TOKENS + sum(len(m["content"].encode()) + 1 + PER_MESSAGE_TOKENS for m in messages)
    return most + max(max_tokens, MIN_ANSWER_TOKENS) <= llm.n_ctx()


def prompt_tokens(llm: Llama, prompt: Prompt) -> int:
    """A fitted prompt's tokens: as ``fit_to_context`` counted them, or, where their size alone said they fit,
    counted now the same way (content tokens, the template's allowance)."""
    if prompt.tokens_in is not None:
        return prompt.tokens_in
    messages = cast(list[dict[str, str]], prompt.messages)
    return TEMPLATE_SLACK_TOKENS + sum(_message_tokens(llm, m) for m in messages)


def _message_tokens(llm: Llama, message: dict[str, str]) -> int:
    return len(llm.tokenize(message["content"].encode(), add_bos=False, special=False)) + PER_MESSAGE_TOKENS


def _split(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, str]]:
    """(system messages, the dialogue's history, its newest message)."""
    dialogue = [m for m in messages if m["role"] != "system"]
    return [m for m in messages if m["role"] == "system"], dialogue[:-1], dialogue[-1]


def _from_a_user(
    system: list[dict[str, str]], history: list[dict[str, str]], last: dict[str, str]
) -> list[dict[str, str]]:
    """The system messages, the history from its first user message on, the newest message."""
    first = next((i for i, m in enumerate(history) if m["role"] == "user"), len(history))
    return [*system, *history[first:], last]
