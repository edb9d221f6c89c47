"""A local prompt read in batches that a cancel stops between them.

llama-cpp-python reads a prompt inside one call (``Llama.eval`` of the tokens its prefix match left, made
from the generator a chat completion's first chunk is asked of), so a cancel looked at between streamed
tokens was seen only once the whole prompt was read: minutes for a long document on a laptop, with every
other client waiting for the model. For one turn, the context's ``eval`` is shadowed by ``PromptReading``,
which hands llama.cpp the same ``n_batch`` slices its own ``eval`` decodes (the same decode calls: the same
answer) and looks at the cancel before each. It stands down at its first call, so the answer's tokens go
to llama.cpp's own method, with no Python added per token.

What was read stays read: llama-cpp-python counts each decoded batch in ``n_tokens`` and ``input_ids``,
which the next prompt's prefix match, and the dialogue cache's save, take as the context's contents; the
context holds nothing past them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from llama_cpp import Llama


class PromptStopped(Exception):
    """The turn was cancelled while its prompt was read: ``unread`` of its new tokens were not."""

    def __init__(self, unread: int) -> None:
        super().__init__(f"the prompt's reading stopped with {unread} tokens unread")
        self.unread = unread


@dataclass
class StoppedReadings:
    """The prompt readings a cancel stopped since the start, and the tokens they left unread: what status
    shows (``prompts_stopped``, in its ``local`` section) of the model freed early."""

    turns: int = 0
    tokens_unread: int = 0

    def count(self, stop: PromptStopped) -> None:
        self.turns += 1
        self.tokens_unread += stop.unread


class PromptReading:
    """While entered, ``llm``'s next ``eval`` (the prompt's reading) stops at ``cancelled`` between batches,
    raising ``PromptStopped`` out of the answer's stream."""

    def __init__(self, llm: Llama, cancelled: threading.Event) -> None:
        self.llm, self.cancelled = llm, cancelled

    def __enter__(self) -> PromptReading:
        self.llm.eval = self._read  # type: ignore[method-assign]  # the instance's attribute shadows the method
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.llm.__dict__.pop("eval", None)  # a stream that never read its prompt leaves none for the next turn

    def _read(self, tokens: Sequence[int]) -> None:
        llm, read = self.llm, type(self.llm).eval
        del llm.eval  # the answer's tokens are llama.cpp's own evals
        read(llm, tokens[:0])  # its first step: what the context holds past the kept prefix goes
        step = llm.n_batch
        for start in range(0, len(tokens), step):
            if self.cancelled.is_set():
                raise PromptStopped(len(tokens) - start)
            read(llm, tokens[start : start + step])
