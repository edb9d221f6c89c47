"""What a GGUF's own chat template accepts, read once as the model loads, and the messages shaped to it.

Chat templates of other families refuse what locod and OpenAI clients send: Gemma's raises on any system
message, Gemma's and Mistral's on two user messages in a row (a client's history after a reply it stopped
or lost), and a template's end-of-turn marker (Gemma's ``<end_of_turn>``, Phi's ``<|end|>``) is no stop
when the vocabulary holds it as plain text, so the answer ran on to ``max_tokens``. The template is
rendered on a few small conversations at load to learn which; each turn's messages are then folded into
the shape it takes (the system prompt into the first user message, a run of one role into one message),
its end-of-turn text is a stop string, and a template that leaves out the BOS its GGUF asks for is given one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from locod.daemon.template_deadline import TEMPLATE_FAILURES

Message = dict[str, Any]
ANSWER = "\x00answer\x00"  # what the probe's assistant says: found again in the rendered text, unlike words
END_MARKER = re.compile(r"\s*(<[^<>\s]{1,40}>)")  # a special token's text, as every family's end of turn is


@dataclass(frozen=True)
class ChatShape:
    """What the model's chat template refuses, the text it ends an answer's turn with, and whether it leaves
    out the BOS the GGUF asks for."""

    folds_system: bool = False  # it refuses a system message: the system prompt goes into the first user's
    merges_runs: bool = False  # it refuses two messages of one role in a row: they become one
    end_of_turn: tuple[str, ...] = ()  # stop strings: what the template writes after an answer
    lacks_bos: bool = False  # the GGUF says prompts begin with BOS (add_bos_token), the template writes none

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
    template = _template_of(llm)
    if template is None:
        return PLAIN
    formatter = _formatter(llm, template)
    hi, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER}
    plain = _render(formatter, [hi])
    if plain is None:
        return PLAIN  # it refuses the plainest turn: each turn says so (model_template), nothing to shape
    bos = formatter.bos_token
    return ChatShape(
        folds_system=_render(formatter, [{"role": "system", "content": "Be brief."}, hi]) is None,
        merges_runs=_render(formatter, [hi, hi]) is None,
        end_of_turn=_unless_generation_ends_there(llm, _end_of_turn(_render(formatter, [hi, answer, hi]))),
        lacks_bos=bool(bos) and llm._model.add_bos_token() and not plain.startswith(bos),
    )


def write_bos(llm: Llama) -> None:
    """Have ``llm``'s chat template begin its prompts with the BOS its GGUF asks for (``lacks_bos``), as
    llama.cpp's own server does: llama-cpp-python adds none to what a template renders (so that one the
    template writes is not doubled), and a template that writes none (Zephyr's) left the prompt without."""
    template = _template_of(llm)
    assert template is not None
    llm.chat_handler = _formatter(llm, "{{ bos_token }}" + template).to_chat_handler()


def _template_of(llm: Llama) -> str | None:
    """The GGUF's template that llama-cpp-python formats ``llm``'s prompts with, if it is one of those."""
    name = str(llm.chat_format or "")
    template = llm.metadata.get("tokenizer." + name) if name.startswith("chat_template.") else None
    if name == "chat_template.default":
        template = llm.metadata.get("tokenizer.chat_template")
    return template if isinstance(template, str) else None


def _formatter(llm: Llama, template: str) -> Jinja2ChatFormatter:
    """The template as llama-cpp-python renders a GGUF's, stopping at its eos."""
    eos, bos = llm.token_eos(), llm.token_bos()
    return Jinja2ChatFormatter(template, _token_text(llm, eos), _token_text(llm, bos), stop_token_ids=[eos])


def _token_text(llm: Llama, token: int) -> str:
    return llm._model.token_get_text(token) if token != -1 else ""


def _render(formatter: Jinja2ChatFormatter, messages: list[Message]) -> str | None:
    """The prompt the template renders of ``messages``; None when it refuses them (whatever it raises)."""
    try:
        return formatter(messages=messages).prompt  # type: ignore[arg-type]
    except TEMPLATE_FAILURES:
        return None


def _end_of_turn(prompt: str | None) -> tuple[str, ...]:
    """The marker a rendered prompt has right after the probe's answer (``<end_of_turn>``, ``<|eot_id|>``,
    ``</s>``): the stop string that ends an answer whose model writes it as text. Empty when no ``<...>``
    marker follows the answer (plain-text formats), or the template refused the turn or changed the answer."""
    _, found, after = (prompt or "").partition(ANSWER)
    marker = END_MARKER.match(after)
    return (marker.group(1),) if found and marker else ()


def _unless_generation_ends_there(llm: Llama, markers: tuple[str, ...]) -> tuple[str, ...]:
    """The markers llama.cpp does not stop at itself: one its vocabulary holds as a single end-of-generation
    token (SmolLM2's ``<|im_end|>``, a real Gemma's ``<end_of_turn>``) ends the answer already, and a stop
    string would only add a check on every token and hold back streamed text that could begin it."""
    vocab = llm._model.vocab
    return tuple(
        marker
        for marker in markers
        if not (
            len(tokens := llm.tokenize(marker.encode(), add_bos=False, special=True)) == 1
            and llama_cpp.llama_vocab_is_eog(vocab, tokens[0])
        )
    )


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
