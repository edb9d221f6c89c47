"""The text of an attached document: decoded, split into chunks, ranked against the prompt and excerpted.

A document is text in UTF-8, or UTF-16 or UTF-32 with a byte-order mark; what is not is named in words. Its
chunks are ranked by term overlap with the prompt, a bounded number of term searches per document, and the
excerpt a cloud model is sent is the best chunks that fit a token budget.
"""

from __future__ import annotations

import codecs
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from locod.daemon.cancel import check_cancelled
from locod.policy.rule import estimate_tokens, prefix_within

UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # a document that begins with one is UTF-16 text
# UTF-32's little-endian mark begins with UTF-16's: looked for first (U+0000 is no text's first character).
UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
# Term searches (prompt term x chunk) a document's ranking may make: a long prompt against a long document
# uses its longest terms only, so ranking stays within milliseconds to a second whatever the sizes.
RANK_SEARCHES = 200_000


@dataclass(frozen=True)
class DocChunk:
    index: int
    text: str
    score: float
    tokens: int  # estimated once, when ranked: an excerpt is chosen for each budget a turn prices


def document_text(data: bytes) -> str | None:
    """A document's text: UTF-8 (its byte-order mark dropped), or UTF-16 or UTF-32 with a byte-order mark,
    as Windows tools write "Unicode" text; None when it is none of them. Every line ends in a newline,
    whatever ended it (Windows' CRLF, classic Mac's CR): paragraphs are found by blank lines, and a CR-only
    file had none, so it was cut by length mid-sentence."""
    try:
        if data.startswith(UTF32_BOMS):
            text = data.decode("utf-32")
        elif data.startswith(UTF16_BOMS):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


NOT_UTF8 = "not UTF-8 text"  # text in another encoding (GB18030, Shift-JIS, Windows-1251) or not text at all


def undecodable(data: bytes) -> str:
    """What a document ``document_text`` could not read is, in words: one whose byte-order mark says UTF-16
    was not "not UTF-8" to its user (a Unix tool's newline appended to a Windows file leaves an odd byte). Text
    that is not UTF-8 is said with its first bad byte's offset and line, so a stray one can be found."""
    for boms, name, unit, uneven in (
        (UTF32_BOMS, "UTF-32", 4, "not a multiple of 4 bytes"),
        (UTF16_BOMS, "UTF-16", 2, "an odd number of bytes"),
    ):
        if data.startswith(boms):
            odd = f", {uneven}" if len(data) % unit else ""
            return f"{name} text, by its byte-order mark, that does not decode (cut short or damaged{odd})"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:  # its place: one stray byte (a Latin-1 "é" pasted in) refused a whole file
        line = data.count(b"\n", 0, exc.start) + 1
        return f"{NOT_UTF8} (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})"
    return NOT_UTF8


def nul_kind(data: bytes) -> str:
    """What a document whose text holds NUL characters is: UTF-16 text without a byte-order mark (every
    other byte zero, as Latin text is in UTF-16, and so "binary" to a UTF-8 reader), or binary data."""
    if len(data) % 2 == 0:
        for endian, zeros in (("little", data[1::2]), ("big", data[::2])):
            if zeros.count(0) > len(zeros) // 2 and "\x00" not in data.decode(f"utf-16-{endian[0]}e", "replace"):
                return f"UTF-16 text without a byte-order mark ({endian}-endian)"
    return "binary data, not text"


def chunk_text(text: str, size: int, cancelled: threading.Event | None = None) -> list[str]:
    """Paragraph-aligned chunks of about ``size`` characters (a long paragraph is cut at ``size``, by index:
    re-slicing the rest each time would copy a one-paragraph document quadratically). A paragraph keeps its
    first line's indentation: in code (a method after a blank line) it is meaning. A paragraph within
    ``size`` is taken as it is, and ``cancelled`` is checked at each: 20 MB of one-letter paragraphs, six
    million, took 27 s on a busy machine (5 s now), past its client's leaving and the daemon's stop."""
    chunks: list[str] = []
    current = ""
    for paragraph in re.split(r"\n\s*\n", text):
        check_cancelled(cancelled)
        paragraph = paragraph.rstrip().lstrip("\n")
        if len(paragraph) > size:
            cut = (len(paragraph) - 1) // size * size  # leaves the last 1 to ``size`` characters
            chunks.extend(paragraph[i : i + size] for i in range(0, cut, size))
            paragraph = paragraph[cut:]
        if current and len(current) + len(paragraph) + 2 > size:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current.strip():
        chunks.append(current)
    return chunks


def ranking_terms(prompt_terms: set[str], chunks: int, searches: int = RANK_SEARCHES) -> list[str]:
    """The prompt terms a document of ``chunks`` chunks is ranked by: all of them while terms x chunks stays
    within ``searches``, else the longest (the most specific), at least one."""
    keep = max(1, searches // max(1, chunks))
    return sorted(prompt_terms, key=lambda t: (-len(t), t))[:keep]


def rank_chunks(
    pieces: list[str],
    prompt_terms: set[str],
    searches: int = RANK_SEARCHES,
    cancelled: threading.Event | None = None,
) -> list[DocChunk]:
    """Chunks best first; a chunk's score is the IDF-weighted share of prompt terms it contains.

    Terms are matched as substrings of the lower-cased chunk ("clause" finds "clauses"): a few C-level
    searches per chunk instead of tokenising the whole document, which keeps a 50-page document in the
    low milliseconds. At most ``searches`` term searches in all (``ranking_terms``), decided before any is
    made, and ``cancelled`` is checked between chunks.
    """
    if not pieces:
        return []
    used = ranking_terms(prompt_terms, len(pieces), searches)
    chunk_terms = []
    for piece in pieces:
        check_cancelled(cancelled)
        lowered = piece.lower()
        chunk_terms.append({t for t in used if t in lowered})
    n = len(pieces)
    counts = {t: 0 for t in used}
    for ct in chunk_terms:
        for t in ct:
            counts[t] += 1
    weight = {t: math.log(1 + n / (1 + counts[t])) + 0.1 for t in used}
    total = sum(weight.values()) or 1.0
    scored = [
        DocChunk(i, p, sum(weight[t] for t in ct) / total, estimate_tokens(p))
        for i, (p, ct) in enumerate(zip(pieces, chunk_terms))
    ]
    return sorted(scored, key=lambda c: (-c.score, c.index))


def chunks_for(chunks: Sequence[DocChunk], budgets: list[int]) -> tuple[DocChunk, ...]:
    """Of a document's ``chunks``, those ``select_chunks`` picks at any of ``budgets``, and the one it cuts
    when none fits, in the document's order: of those alone it picks at each of those budgets what it picks
    of the whole document (its scan, in the same order, meets the same sums at each chunk it keeps), so a
    question waiting to be asked keeps them rather than the whole document."""
    candidates = _candidates(chunks)
    kept = {chunk.index for budget in budgets for chunk in select_chunks(chunks, budget)}
    kept.update(c.index for c in candidates[:1])  # the best one, cut to a budget too small for it
    return tuple(c for c in chunks if c.index in kept)


def _candidates(chunks: Sequence[DocChunk]) -> list[DocChunk]:
    """The chunks an excerpt is chosen from, best first: those that share terms with the prompt, or when
    none does ("summarise this"), the document from its opening."""
    return [c for c in chunks if c.score > 0] or sorted(chunks, key=lambda c: c.index)


def select_chunks(chunks: Sequence[DocChunk], token_budget: int) -> list[DocChunk]:
    """The best of a document's ``chunks`` that fit ``token_budget`` (tokens estimated from their text, in any
    script), back in document order.

    Only chunks that share terms with the prompt are sent; when none does ("summarise this"), the
    document's opening chunks are. A budget too small for any whole chunk gets the best one's beginning.
    """
    candidates = _candidates(chunks)
    chosen, used = [], 0
    for chunk in candidates:
        cost = chunk.tokens + 1
        if used + cost > token_budget:
            continue
        chosen.append(chunk)
        used += cost
    if not chosen and candidates and (cut := prefix_within(candidates[0].text, token_budget - 1)):
        best = candidates[0]
        return [DocChunk(best.index, cut, best.score, estimate_tokens(cut))]
    return sorted(chosen, key=lambda c: c.index)
