"""What a GGUF's own chat template accepts, read once as the model loads, and the messages shaped to it.

Chat templates of other families refuse what locod and OpenAI clients send: Gemma's raises on any system
message, Gemma's and Mistral's on two user messages in a row (a client's history after a reply it stopped
or lost), and a template's end-of-turn marker (Gemma's ``<end_of_turn>``, Phi's ``<|end|>``) is no stop
when the vocabulary holds it as plain text, so the answer ran on to ``max_tokens``. The template is
rendered on a few small conversations at load to learn which; each turn's messages are then folded into
the shape it takes (the system prompt into the first user message, a run of one role into one message),
and its end-of-turn text is a stop string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from locod.daemon.template_deadline import TEMPLATE_FAILURES

Message = dict[str, Any]
ANSWER = "\x00answer\x00"  # what the probe's assistant says: found again in the rendered text, unlike words
END_MARKER = re.compile(r"\s*(<[^<>\s]{1,40}>)")  # a special token's text, as every family's end of turn is


@dataclass(frozen=True)
class ChatShape:
    """What the model's chat template refuses, and the text it ends an answer's turn with."""

    folds_system: bool = False  # it refuses a system message: the system prompt goes into the first user's
    merges_runs: bool = False  # it refuses two messages of one role in a row: they become one
    end_of_turn: tuple[str, ...] = ()  # stop strings: what the template writes after an answer

    def shaped(self, messages: Sequence[Message]) -> list[Message]:
        """The messages as the template takes them (a copy; the turn's own are recorded as sent)."""
        shaped = [dict(m) for m in messages]
        if self.folds_system:
            shaped = _fold_system(shaped)
        if self.merges_runs:
            shaped = _merge_runs(shaped)
        return shaped

    def refusals(self) -> list[str]:
        """What is folded, in words, for the log at load."""
        said = ["a system message: it is folded into the first user message"] if self.folds_system else []
        return said + (["two messages of one role in a row: they are merged"] if self.merges_runs else [])


PLAIN = ChatShape()  # a built-in chat_format of llama-cpp-python's: it takes what it is given, and stops itself


def shape_of(llm: Llama) -> ChatShape:
    """The shape of ``llm``'s chat template, from renders of small conversations; PLAIN when llama-cpp-python
    formats its prompts with a built-in format (configured, guessed from the template, or Llama 2's for a
    GGUF that has none) rather than the GGUF's Jinja. Run under the caller's template deadline."""
    name = str(llm.chat_format or "")
    template = llm.metadata.get("tokenizer." + name) if name.startswith("chat_template.") else None
    if name == "chat_template.default":
        template = llm.metadata.get("tokenizer.chat_template")
    if not isinstance(template, str):
        return PLAIN
    formatter = Jinja2ChatFormatter(template, _token_text(llm, llm.token_eos()), _token_text(llm, llm.token_bos()))
    hi, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER}
    if not _renders(formatter, [hi]):
        return PLAIN  # it refuses the plainest turn: each turn says so (model_template), nothing to shape
    return ChatShape(
        folds_system=not _renders(formatter, [{"role": "system", "content": "Be brief."}, hi]),
        merges_runs=not _renders(formatter, [hi, hi]),
        end_of_turn=_end_of_turn(formatter, [hi, answer, hi]),
    )


def _token_text(llm: Llama, token: int) -> str:
    return llm._model.token_get_text(token) if token != -1 else ""


def _renders(formatter: Jinja2ChatFormatter, messages: list[Message]) -> bool:
    try:
        formatter(messages=messages)  # type: ignore[arg-type]
    except TEMPLATE_FAILURES:  # whatever the template raises, it refuses this conversation
        return False
    return True


def _end_of_turn(formatter: Jinja2ChatFormatter, messages: list[Message]) -> tuple[str, ...]:
    """The marker the template writes right after an answer (``<end_of_turn>``, ``<|eot_id|>``, ``</s>``):
    the stop string that ends an answer whose model writes it as text. Empty when no ``<...>`` marker follows
    the answer (plain-text formats), or the template does not render the answer as given."""
    try:
        prompt = formatter(messages=messages).prompt  # type: ignore[arg-type]
    except TEMPLATE_FAILURES:  # a template that refuses this turn shape has no end to learn
        return ()
    _, found, after = prompt.partition(ANSWER)
    marker = END_MARKER.match(after)
    return (marker.group(1),) if found and marker else ()


def _fold_system(messages: list[Message]) -> list[Message]:
    """The system messages' text put before the first user message's, as Gemma's own guide does."""
    system = "\n\n".join(str(m["content"]) for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if system and first_user is not None:
        rest[first_user] = {**rest[first_user], "content": f"{system}\n\n{rest[first_user]['content']}"}
    return rest


def _merge_runs(messages: list[Message]) -> list[Message]:
    """Each run of messages of one role as one message, their texts a blank line apart."""
    merged: list[Message] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{message['content']}"}
        else:
            merged.append(dict(message))
    return merged
