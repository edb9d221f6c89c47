"""Attachments of a turn: loaded, made ready to upload, and scored for relevance to the prompt.

An image's pixels are daemon/images.py's, decoded within one memory budget shared by all turns
(``DECODES``, daemon/decode_budget.py) and downscaled to a longest side; a document's text is
daemon/documents.py's. Every attachment gets a relevance score in [0, 1]: TMO's "association" signal, which
the decision uses.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from locod.daemon.cancel import check_cancelled
from locod.daemon.config import AttachmentsConfig
from locod.daemon.decode_budget import DecodeBudget
from locod.daemon.documents import (
    NOT_UTF8,
    DocChunk,
    chunk_text,
    document_text,
    nul_kind,
    rank_chunks,
    undecodable,
)
from locod.daemon.images import (
    blank_alpha_dropped,
    decode,
    decode_bytes,
    encode_under,
    has_alpha,
    image_size,
    on_white,
    transparent_gray,
    upright,
)
from locod.daemon.safe_open import over_limit, read_allowed
from locod.daemon.textwords import pairs
from locod.errors import AttachmentError
from locod.filekinds import binary_kind
from locod.policy.rule import MIN_RELEVANCE
from locod.protocol import Attachment

DECODES = DecodeBudget()  # every turn's image decodes share it
# Words that carry no topic: left out of relevance scoring.
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "could",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "me",
        "my",
        "of",
        "on",
        "or",
        "please",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "this",
        "those",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "about",
        "into",
        "than",
        "just",
        "also",
        "more",
        "most",
        "some",
        "any",
        "all",
    ]
)
# What a document that is not UTF-8 is to be turned into: often text in another encoding, to its user
CONVERT_TO_UTF8 = "convert it to UTF-8 text first (from another encoding: `iconv -f GB18030 -t UTF-8`, SHIFT_JIS ...)"
# An image's relevance: this base, raised by a prompt that points at pictures (IMAGE_CUES) or names the file.
IMAGE_BASE_RELEVANCE = 0.2
# A prompt that points at none of its turn's attachments ("summarise this", "what does the sign say?") is
# about all of them: each is then as relevant as an image the prompt points at, so it is uploaded (it
# scored 0.0 or 0.2 before, under the rule's MIN_RELEVANCE, and a cloud answered "summarise this" unseen).
SUBJECT_RELEVANCE = 0.7
# A prompt that points at "this picture" wants the image even if nothing else matches.
IMAGE_CUES = frozenset(
    [
        "image",
        "images",
        "picture",
        "pictures",
        "photo",
        "photos",
        "screenshot",
        "see",
        "look",
        "shown",
        "show",
        "visible",
        "diagram",
        "chart",
        "figure",
        "camera",
        "scan",
        "pic",
    ]
)


@dataclass(frozen=True)
class PreparedAttachment:
    kind: str
    name: str
    private: bool
    relevance: float
    original_bytes: int
    jpeg: bytes = b""
    width: int = 0
    height: int = 0
    chunks: tuple[DocChunk, ...] = ()

    @property
    def matched(self) -> bool:
        """Whether the prompt points at it: relevant enough for the rule to upload it (terms its chunks share,
        an image it names or cues). One word in common ("points" in "three bullet points") is not pointing."""
        return self.relevance >= MIN_RELEVANCE

    @functools.cached_property
    def upload_bytes(self) -> int:
        """About what uploading it sends over the radio: the JPEG in base64 (exactly), or a document's three
        best chunks (the excerpt sent depends on the turn's budget). The decision's energy estimate and the
        cloud turn's accounting both use it; cached, as every cloud action of a turn asks."""
        return 4 * ((len(self.jpeg) + 2) // 3) + sum(len(ch.text) for ch in self.chunks[:3])

    def summary(self) -> dict[str, object]:
        """What the decision record keeps of it (never the content)."""
        out: dict[str, object] = {
            "name": self.name,
            "kind": self.kind,
            "private": self.private,
            "relevance": round(self.relevance, 4),
            "bytes": self.original_bytes,
        }
        if self.kind == "image":
            out.update(width=self.width, height=self.height, jpeg_bytes=len(self.jpeg))
        else:
            out.update(chunks=len(self.chunks))
        return out


def as_subjects(prepared: list[PreparedAttachment]) -> list[PreparedAttachment]:
    """A turn's attachments scored as a whole: when the prompt points at none of them it is about all of
    them (a user attaches a file to the turn that asks about it), so each is at least SUBJECT_RELEVANCE;
    when it points at some, the others keep their own lower score."""
    if any(a.matched for a in prepared):
        return prepared
    return [replace(a, relevance=max(a.relevance, SUBJECT_RELEVANCE)) for a in prepared]


def terms(text: str) -> set[str]:
    """The words of ``text`` a document's relevance is scored by, in any script (textwords.pairs): by
    ``[a-z0-9]+`` alone, a Russian or Chinese prompt had none, matched no document, and so its turn's every
    document was as relevant as any other, its excerpt the document's opening, not its part the prompt
    asked about."""
    return {w for w in pairs(text.lower()) if w not in STOPWORDS and len(w) > 1}


def load_bytes(attachment: Attachment, allow_dirs: list[str], max_bytes: int) -> bytes:
    """The attachment's bytes; a path is read only as a regular file under an allowed dir (safe_open)."""
    if attachment.data is not None:
        data = attachment.data
    else:
        assert attachment.path is not None
        data = read_allowed(attachment.path, allow_dirs, max_bytes, attachment.name)
    if len(data) > max_bytes:
        raise over_limit(attachment.name, max_bytes)
    if not data:
        raise AttachmentError(f"attachment {attachment.name!r} is empty")
    return data


def prepare(
    attachment: Attachment,
    data: bytes,
    prompt_terms: set[str],
    config: AttachmentsConfig,
    cancelled: threading.Event | None = None,
) -> PreparedAttachment:
    """The attachment checked and made ready; ``cancelled`` (the client left, the daemon is stopping) stops
    the work between steps."""
    if attachment.kind == "image":
        return _prepare_image(attachment, data, prompt_terms, config, cancelled)
    return _prepare_document(attachment, data, prompt_terms, config, cancelled)


def _prepare_image(
    attachment: Attachment,
    data: bytes,
    prompt_terms: set[str],
    config: AttachmentsConfig,
    cancelled: threading.Event | None,
) -> PreparedAttachment:
    """Checked, decoded on white, shrunk to ``image_max_side``, turned upright and re-encoded as JPEG."""
    where = f"image {attachment.name!r}"
    fmt, width, height = _accepted_size(data, config, where)
    pixels, orientation = _decoded(data, fmt, width, height, config, cancelled, where)
    h, w = pixels.shape[:2]
    scale = config.image_max_side / max(h, w)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    pixels = upright(pixels, orientation)  # once shrunk: turning it copies it
    jpeg = encode_under(pixels, config.image_jpeg_bytes, where)
    h, w = pixels.shape[:2]
    relevance = _image_relevance(attachment.name, prompt_terms)
    return PreparedAttachment(
        "image", attachment.name, attachment.private, relevance, len(data), jpeg=jpeg, width=w, height=h
    )


def _accepted_size(data: bytes, config: AttachmentsConfig, where: str) -> tuple[str, int, int]:
    """The image's format and size from its header, within ``image_max_pixels`` and 65535 a side."""
    try:
        fmt, width, height = image_size(data)
    except AttachmentError as exc:
        raise AttachmentError(f"{where}: {exc.message}", code=exc.code) from None
    if width == 0 or height == 0 or width * height > config.image_max_pixels or max(width, height) > 65_535:
        raise AttachmentError(
            f"{where}: {width}x{height} pixels is outside the accepted size (at most {config.image_max_pixels} pixels, "
            "attachments.image_max_pixels, and 65535 a side)",
            code="bad_image",
        )
    return fmt, width, height


def _decoded(
    data: bytes,
    fmt: str,
    width: int,
    height: int,
    config: AttachmentsConfig,
    cancelled: threading.Event | None,
    where: str,
) -> tuple[np.ndarray, int]:
    """The pixels as 8-bit BGR on white, decoded within the shared decode budget at the smallest scale that
    still covers ``image_max_side``, checked to be the size the header said; and the EXIF turn left to apply."""
    # Transparency is read with the alpha channel (OpenCV then leaves the EXIF turn to us: ``decode``).
    # Asked once: a PNG's chunks are walked in Python, 20 MB of empty chunks in about a second.
    alpha = has_alpha(fmt, data)
    flag, factor = _decode_scale(fmt, max(width, height), alpha, config.image_max_side)
    needed, budget = decode_bytes(fmt, data, width, height, factor, alpha), config.decode_mb << 20
    if needed > budget:
        raise AttachmentError(
            f"{where}: decoding its {width}x{height} pixels takes about {needed >> 20} MiB, more than "
            f"attachments.decode_mb ({config.decode_mb} MiB)",
            code="bad_image",
        )
    with DECODES.hold(needed, budget, cancelled):
        check_cancelled(cancelled)
        pixels, orientation = decode(data, flag, alpha)
        if pixels is not None:  # its BGR copy is part of the decode's peak
            pixels = on_white(blank_alpha_dropped(fmt, pixels), transparent_gray(fmt, data) if alpha else None)
    if pixels is None:
        raise AttachmentError(f"{where}: OpenCV could not decode it ({fmt})", code="bad_image")
    h, w = pixels.shape[:2]
    expected = (math.ceil(width / factor), math.ceil(height / factor))
    if (w, h) not in (expected, expected[::-1]):  # the decoder read another frame (EXIF may turn it a quarter)
        raise AttachmentError(
            f"{where}: decodes to {w * factor}x{h * factor} pixels, not the {width}x{height} its header says",
            code="bad_image",
        )
    return pixels, orientation


def _decode_scale(fmt: str, longest: int, alpha: bool, max_side: int) -> tuple[int, int]:
    """OpenCV's read flag and the scale it decodes at: a JPEG at 1/2, 1/4 or 1/8 where that still covers
    ``max_side`` (far cheaper than decoding 12 MP then shrinking); anything else whole."""
    if fmt == "jpeg":
        for scale, reduced in (
            (8, cv2.IMREAD_REDUCED_COLOR_8),
            (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2),
        ):
            if longest // scale >= max_side:
                return reduced, scale
    return (cv2.IMREAD_UNCHANGED if alpha else cv2.IMREAD_COLOR), 1


def _image_relevance(name: str, prompt_terms: set[str]) -> float:
    """The base, raised by a prompt that points at pictures or shares the file name's words."""
    name_terms = terms(Path(name).stem.replace("_", " ").replace("-", " "))
    overlap = len(name_terms & prompt_terms) / max(1, len(name_terms))
    cue = 1.0 if prompt_terms & IMAGE_CUES else 0.0
    return min(1.0, IMAGE_BASE_RELEVANCE + 0.5 * cue + 0.5 * overlap)


def _prepare_document(
    attachment: Attachment,
    data: bytes,
    prompt_terms: set[str],
    config: AttachmentsConfig,
    cancelled: threading.Event | None,
) -> PreparedAttachment:
    text = None if binary_kind(data) else document_text(data)  # an ASCII-only PDF decodes, and is no text
    if text is None or "\x00" in text:
        what = binary_kind(data) or (nul_kind(data) if text is not None else undecodable(data))
        # a Chinese, Japanese or Russian user's text file is often GB18030, Shift-JIS or Windows-1251: text
        then = CONVERT_TO_UTF8 if what.startswith(NOT_UTF8) else "convert it to text first"
        raise AttachmentError(
            f"document {attachment.name!r} is {what}: locod reads UTF-8 text (or UTF-16 or UTF-32 with a "
            f"byte-order mark) such as plain text, Markdown, CSV or code; {then}",
            code="bad_document",
        )
    pieces = chunk_text(text, config.doc_chunk_chars, cancelled)
    chunks = rank_chunks(pieces, prompt_terms, cancelled=cancelled)
    relevance = chunks[0].score if chunks else 0.0
    return PreparedAttachment(
        "document", attachment.name, attachment.private, relevance, len(data), chunks=tuple(chunks)
    )
