"""What an answer made from private material is known by again: SHA-256 digests of its words.

A turn answered locally from private material records its answer's digests (``Outcome.private_answer``,
table ``private_openings``); a client that later sends that answer back as its own history (an OpenAI
client resends the whole conversation) does not get it sent to a cloud model (``TurnRunner._sent_private``
asks ``DecisionLog.private_answers``).
"""

from __future__ import annotations

import hashlib

from locod.daemon.openai_wire import broke_off_parts
from locod.daemon.textwords import characters

# Words of a private answer's opening kept as digests (``opening_digests``): a part a client sends back of
# it is known by as many of them as it has, from two on (one word, "The" or "Sure,", would keep back any
# short message that begins with it, and tells little).
# Chinese, Japanese and Thai have no spaces: each character is a word (textwords.characters), else a
# Chinese answer was one word, with no opening at all.
MIN_OPENING_WORDS, OPENING_WORDS = 2, 8


def answer_digest(text: str) -> str:
    """What an answer is known by again (column ``private_answer``): the SHA-256 of its words, whitespace
    collapsed. A client does not always send an answer back byte for byte (a chat UI trims it, a browser's
    text field turns its line ends into CRLF): known by its exact text, such an answer went to the cloud."""
    return _sha256(" ".join(text.split()))


def opening_digests(text: str) -> tuple[str, ...]:
    """The digests of an answer's first 2 to ``OPENING_WORDS`` words (table ``private_openings``): a chat UI
    keeps an answer its user stopped halfway and sends that part back, which no digest of the whole matches."""
    words = characters(text)
    return tuple(_sha256(" ".join(words[:n])) for n in range(MIN_OPENING_WORDS, min(OPENING_WORDS, len(words)) + 1))


def answer_digests(text: str) -> tuple[str, ...]:
    """What an answer a client sends back may be known by: ``answer_digest``; its exact text's SHA-256, which
    logs written before whitespace was collapsed hold; and its opening, with and without its last word (an
    answer cut mid-word) when it is shorter than the opening."""
    words = characters(text)
    opening = words[:OPENING_WORDS]
    cut = opening[:-1] if len(words) <= OPENING_WORDS else opening
    parts = [" ".join(part) for part in (opening, cut) if len(part) >= MIN_OPENING_WORDS]
    return answer_digest(text), _sha256(text), *(_sha256(part) for part in parts)


def resent_digests(content: str) -> list[str]:
    """What a message of a client's history may be known by: the ``answer_digests`` of each answer it holds.
    An HTTP client's message may hold two: a cloud answer that broke off, then the local one (``broke_off``)."""
    return [digest for part in broke_off_parts(content) for digest in answer_digests(part)]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode(errors="surrogatepass")).hexdigest()
