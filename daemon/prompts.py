"""What each kind of model is sent for a turn: the history, then the question with the documents' most
relevant excerpts; a cloud model also gets the images the decision uploads.

Documents stay on the device for the local model, so it sees their best chunks (within a third of its
context); a cloud model sees excerpts of only the documents sent, within ``attachments.doc_token_budget``.
Private material never reaches a cloud model: not its attachments, nor the earlier answers made from them,
the session's (``Session.shareable`` puts a placeholder in their place) or those a client sends back as its
own history (``Turn.sent_private``); ``withheld_history`` says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from locod.daemon.attachments import PreparedAttachment
from locod.daemon.backends import Prompt, Upload
from locod.daemon.documents import chunks_for, select_chunks
from locod.daemon.images import data_url
from locod.daemon.sessions import WITHHELD
from locod.errors import PromptTooLong

if TYPE_CHECKING:
    from locod.daemon.turn import Turn


def history(turn: Turn, cloud: bool = False) -> list[dict[str, str]]:
    """The session's earlier messages, then this request's own (all but its last user message); for a
    cloud model, without the answers made from private material (the session's, and the client's own
    history's that this daemon made so)."""
    if not cloud:
        return [*turn.session.messages, *turn.request.messages[:-1]]
    sent = [
        {"role": m["role"], "content": WITHHELD} if i in turn.sent_private else m
        for i, m in enumerate(turn.request.messages[:-1])
    ]
    return [*turn.session.shareable(), *sent]


def withheld_history(turn: Turn) -> str | None:
    """What a cloud model answering this turn is not sent of the history, in words (None: nothing)."""
    count = turn.session.withheld + len(turn.sent_private)
    if not count:
        return None
    answers = "answer" if count == 1 else "answers"
    of = "" if turn.sent_private else " of this session"
    return f"{count} earlier {answers}{of} made from private attachments left out of what the cloud is sent"


MIN_DOC_TOKENS = 16  # a local prompt's document excerpts are halved to fit its context down to this, no further


def documents_text(attachments: Sequence[PreparedAttachment], token_budget: int) -> str:
    """The documents' best excerpts, the budget shared equally between them (images are skipped)."""
    docs = [a for a in attachments if a.kind == "document"]
    parts = []
    for doc in docs:
        chunks = select_chunks(doc.chunks, token_budget // max(1, len(docs)))
        excerpt = "\n[...]\n".join(c.text for c in chunks)
        parts.append(f"Document {doc.name!r} (relevant excerpts):\n{excerpt}")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class LocalQuestion:
    """What a local model is asked for a turn: the history, then the question with excerpts of all the
    documents (they stay on the device). Taken when the turn is, so a shadow answer made later is asked
    what the turn was, not what the session has become."""

    history: list[dict[str, object]]
    question: str
    attachments: Sequence[PreparedAttachment]
    n_ctx: int

    @classmethod
    def of(cls, turn: Turn, n_ctx: int) -> LocalQuestion:
        return cls([dict(m) for m in history(turn)], turn.request.prompt, tuple(turn.attachments), n_ctx)

    def messages(self, doc_tokens: int) -> list[dict[str, object]]:
        docs = documents_text(self.attachments, doc_tokens)
        return [*self.history, {"role": "user", "content": f"{docs}\n\n{self.question}" if docs else self.question}]

    def fitted(self, fit: Callable[[list[dict[str, object]]], Prompt]) -> Prompt:
        """The prompt ``fit`` makes of the messages, which refuses what the model cannot hold. Documents get a
        third of the context, estimated from their text, which a model's own tokenizer may count at more (an
        English-only model's, Chinese): while the question with its excerpts does not fit, the excerpts are
        halved, and only a question too long without them is refused."""
        documents = any(a.kind == "document" for a in self.attachments)
        *larger, smallest = self.doc_budgets() if documents else self.doc_budgets()[:1]
        for doc_tokens in larger:
            with contextlib.suppress(PromptTooLong):
                return fit(self.messages(doc_tokens))
        return fit(self.messages(smallest))

    def doc_budgets(self) -> list[int]:
        """The documents' token budgets ``fitted`` tries in turn: a third of the context, halved down to
        ``MIN_DOC_TOKENS``."""
        budgets = [self.n_ctx // 3]
        while budgets[-1] // 2 >= MIN_DOC_TOKENS:
            budgets.append(budgets[-1] // 2)
        return budgets

    def kept(self) -> LocalQuestion:
        """This question holding only what its prompts can use: of each document the chunks some budget of
        ``fitted`` selects, and no image (the local model reads none). A shadow job waits in its lane's queue
        with its question: holding the turn's whole attachments, sixteen of them kept up to
        ``daemon.max_message_bytes`` each in memory, for a few kilobytes of excerpts."""
        documents = [a for a in self.attachments if a.kind == "document"]
        shares = [budget // len(documents) for budget in self.doc_budgets()] if documents else []
        kept = tuple(replace(doc, chunks=chunks_for(doc.chunks, shares)) for doc in documents)
        return replace(self, attachments=kept)


def cloud_text(turn: Turn, send: tuple[int, ...], doc_token_budget: int) -> list[dict[str, str]]:
    """What a cloud model is sent for the turn, less the images: the history, then the question with the
    excerpts of the documents among ``send``. The daily cap prices a cloud action by it (``Turn.cloud_price``)."""
    docs = documents_text([turn.attachments[i] for i in send], doc_token_budget)
    text = f"{docs}\n\n{turn.request.prompt}" if docs else turn.request.prompt
    return [*history(turn, cloud=True), {"role": "user", "content": text}]


def cloud_messages(turn: Turn, send: tuple[int, ...], doc_token_budget: int) -> tuple[list[dict[str, object]], Upload]:
    """The messages in the OpenAI shape (images as data URLs), and what they upload."""
    *earlier, question = cloud_text(turn, send, doc_token_budget)
    text = question["content"]
    images = [turn.attachments[i] for i in send if turn.attachments[i].kind == "image"]
    parts: list[dict[str, object]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(image.jpeg)}} for image in images]
    asked: dict[str, object] = {"role": "user", "content": parts if images else text}
    messages = [*(dict[str, object](m) for m in earlier), asked]
    upload_bytes = len(text.encode()) + sum(image.upload_bytes for image in images)
    return messages, Upload(images=len(images), bytes=upload_bytes)
