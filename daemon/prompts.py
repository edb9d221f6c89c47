"""What each kind of model is sent for a turn: the history, then the question with the documents' most
relevant excerpts; a cloud model also gets the images the decision uploads.

Documents stay on the device for the local model, so it sees their best chunks (within a third of its
context); a cloud model sees excerpts of only the documents sent, within ``attachments.doc_token_budget``.
Private material never reaches a cloud model: not its attachments, nor the earlier answers made from them,
the session's (``Session.shareable`` puts a placeholder in their place) or those a client sends back as its
own history (``Turn.sent_private``); ``withheld_history`` says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from locod.daemon import attachments as att
from locod.daemon.backends import Upload
from locod.daemon.sessions import WITHHELD

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


def documents_text(turn: Turn, indices: list[int], token_budget: int) -> str:
    """The chosen documents' best excerpts, the budget shared equally between them."""
    docs = [turn.attachments[i] for i in indices if turn.attachments[i].kind == "document"]
    parts = []
    for doc in docs:
        chunks = att.select_chunks(doc, token_budget // max(1, len(docs)))
        excerpt = "\n[...]\n".join(c.text for c in chunks)
        parts.append(f"Document {doc.name!r} (relevant excerpts):\n{excerpt}")
    return "\n\n".join(parts)


def local_messages(turn: Turn, n_ctx: int, doc_tokens: int | None = None) -> list[dict[str, object]]:
    """``doc_tokens``: the documents' share of the context, a third of it unless given."""
    docs = documents_text(turn, list(range(len(turn.attachments))), n_ctx // 3 if doc_tokens is None else doc_tokens)
    question = turn.request.prompt
    return _asking(turn, f"{docs}\n\n{question}" if docs else question)


def cloud_messages(turn: Turn, send: tuple[int, ...], doc_token_budget: int) -> tuple[list[dict[str, object]], Upload]:
    """The messages in the OpenAI shape (images as data URLs), and what they upload."""
    docs = documents_text(turn, list(send), doc_token_budget)
    text = f"{docs}\n\n{turn.request.prompt}" if docs else turn.request.prompt
    images = [turn.attachments[i] for i in send if turn.attachments[i].kind == "image"]
    parts: list[dict[str, object]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": att.data_url(image.jpeg)}} for image in images]
    messages = _asking(turn, parts if images else text, cloud=True)
    upload_bytes = len(text.encode()) + sum(image.upload_bytes for image in images)
    return messages, Upload(images=len(images), bytes=upload_bytes)


def _asking(turn: Turn, content: object, cloud: bool = False) -> list[dict[str, object]]:
    """The history, then the question as this model gets it."""
    messages: list[dict[str, object]] = [dict(m) for m in history(turn, cloud)]
    return [*messages, {"role": "user", "content": content}]
