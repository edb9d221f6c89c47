"""Attachments of a turn: checked, made ready to upload, and scored for relevance to the prompt.

Images are sniffed (format, dimensions, completeness) from their header before a pixel is decoded, then
decoded with OpenCV, downscaled to a longest side and re-encoded as JPEG under a byte budget. Documents
(UTF-8 text or Markdown) are split into chunks ranked by term overlap with the prompt. Every attachment
gets a relevance score in [0, 1]: TMO's "association" signal, which the decision uses.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from locod.daemon.config import AttachmentsConfig
from locod.daemon.safe_open import read_allowed
from locod.errors import AttachmentError
from locod.policy.rule import estimate_tokens
from locod.protocol import Attachment

WORD = re.compile(r"[a-z0-9]+")
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
class DocChunk:
    index: int
    text: str
    score: float


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


def terms(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1}


def load_bytes(attachment: Attachment, allow_dirs: list[str], max_bytes: int) -> bytes:
    """The attachment's bytes; a path is read only as a regular file under an allowed dir (safe_open)."""
    if attachment.data is not None:
        data = attachment.data
    else:
        assert attachment.path is not None
        data = read_allowed(attachment.path, allow_dirs, max_bytes, attachment.name)
    if len(data) > max_bytes:
        raise AttachmentError(
            f"attachment {attachment.name!r} is over the {max_bytes}-byte limit", code="attachment_too_large"
        )
    if not data:
        raise AttachmentError(f"attachment {attachment.name!r} is empty")
    return data


def prepare(
    attachment: Attachment, data: bytes, prompt_terms: set[str], config: AttachmentsConfig
) -> PreparedAttachment:
    if attachment.kind == "image":
        return _prepare_image(attachment, data, prompt_terms, config)
    return _prepare_document(attachment, data, prompt_terms, config)


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; raises AttachmentError for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if b"IEND" not in data[-16:]:
            raise AttachmentError("PNG is truncated (no IEND chunk)", code="bad_image")
        return "png", width, height
    if data.startswith(b"\xff\xd8"):
        if b"\xff\xd9" not in data[-64:]:
            raise AttachmentError("JPEG is truncated (no end-of-image marker)", code="bad_image")
        return ("jpeg", *_jpeg_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return "webp", 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", data[26:30])
            return "webp", w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return "bmp", abs(w), abs(h)
    raise AttachmentError("not a supported image (PNG, JPEG, WebP or BMP)", code="bad_image")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    raise AttachmentError("JPEG has no frame header", code="bad_image")


def _prepare_image(
    attachment: Attachment, data: bytes, prompt_terms: set[str], config: AttachmentsConfig
) -> PreparedAttachment:
    where = f"image {attachment.name!r}"
    try:
        fmt, width, height = image_size(data)
    except AttachmentError as exc:
        raise AttachmentError(f"{where}: {exc.message}", code=exc.code) from None
    if width == 0 or height == 0 or width * height > config.image_max_pixels or max(width, height) > 65_535:
        raise AttachmentError(
            f"{where}: {width}x{height} pixels is outside the accepted size (at most {config.image_max_pixels} pixels)",
            code="bad_image",
        )
    longest = max(width, height)
    # JPEG can decode at 1/2, 1/4, 1/8 scale directly: far cheaper than decoding 12 MP then shrinking.
    flag = cv2.IMREAD_COLOR
    if fmt == "jpeg":
        for factor, reduced in (
            (8, cv2.IMREAD_REDUCED_COLOR_8),
            (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2),
        ):
            if longest // factor >= config.image_max_side:
                flag = reduced
                break
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if pixels is None:
        raise AttachmentError(f"{where}: OpenCV could not decode it ({fmt})", code="bad_image")
    h, w = pixels.shape[:2]
    scale = config.image_max_side / max(h, w)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    jpeg = _encode_under(pixels, config.image_jpeg_bytes, where)
    h, w = pixels.shape[:2]
    name_terms = terms(Path(attachment.name).stem.replace("_", " ").replace("-", " "))
    overlap = len(name_terms & prompt_terms) / max(1, len(name_terms))
    cue = 1.0 if prompt_terms & IMAGE_CUES else 0.0
    relevance = min(1.0, 0.2 + 0.5 * cue + 0.5 * overlap)
    return PreparedAttachment(
        "image", attachment.name, attachment.private, relevance, len(data), jpeg=jpeg, width=w, height=h
    )


def _encode_under(pixels: np.ndarray, budget: int, where: str) -> bytes:
    """JPEG at the best quality that fits the byte budget, shrinking the image as a last resort."""
    for _ in range(4):
        for quality in (85, 70, 55, 40):
            ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(buf) <= budget:
                return bytes(buf)
        h, w = pixels.shape[:2]
        pixels = cv2.resize(pixels, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    raise AttachmentError(f"{where}: cannot be encoded under {budget} bytes", code="bad_image")


def _prepare_document(
    attachment: Attachment, data: bytes, prompt_terms: set[str], config: AttachmentsConfig
) -> PreparedAttachment:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AttachmentError(
            f"document {attachment.name!r} is not UTF-8 text (plain text or Markdown)", code="bad_document"
        ) from None
    if "\x00" in text:
        raise AttachmentError(f"document {attachment.name!r} holds binary data", code="bad_document")
    pieces = chunk_text(text, config.doc_chunk_chars)
    chunks = rank_chunks(pieces, prompt_terms)
    relevance = chunks[0].score if chunks else 0.0
    return PreparedAttachment(
        "document", attachment.name, attachment.private, relevance, len(data), chunks=tuple(chunks)
    )


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def chunk_text(text: str, size: int) -> list[str]:
    """Paragraph-aligned chunks of about ``size`` characters (a long paragraph is cut at ``size``)."""
    chunks: list[str] = []
    current = ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        while len(paragraph) > size:
            chunks.append(paragraph[:size])
            paragraph = paragraph[size:]
        if current and len(current) + len(paragraph) + 2 > size:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current.strip():
        chunks.append(current)
    return chunks


def rank_chunks(pieces: list[str], prompt_terms: set[str]) -> list[DocChunk]:
    """Chunks best first; a chunk's score is the IDF-weighted share of prompt terms it contains.

    Terms are matched as substrings of the lower-cased chunk ("clause" finds "clauses"): a few C-level
    searches per chunk instead of tokenising the whole document, which keeps a 50-page document in the
    low milliseconds.
    """
    if not pieces:
        return []
    chunk_terms = [{t for t in prompt_terms if t in piece.lower()} for piece in pieces]
    n = len(pieces)
    weight = {t: math.log(1 + n / (1 + sum(t in ct for ct in chunk_terms))) + 0.1 for t in prompt_terms}
    total = sum(weight.values()) or 1.0
    scored = [DocChunk(i, p, sum(weight[t] for t in ct) / total) for i, (p, ct) in enumerate(zip(pieces, chunk_terms))]
    return sorted(scored, key=lambda c: (-c.score, c.index))


def select_chunks(doc: PreparedAttachment, token_budget: int) -> list[DocChunk]:
    """The best chunks that fit ``token_budget`` (tokens estimated from characters), back in document order.

    Only chunks that share terms with the prompt are sent; when none does ("summarise this"), the
    document's opening chunks are.
    """
    candidates = [c for c in doc.chunks if c.score > 0] or sorted(doc.chunks, key=lambda c: c.index)
    chosen, used = [], 0
    for chunk in candidates:
        cost = estimate_tokens(len(chunk.text)) + 1
        if used + cost > token_budget:
            continue
        chosen.append(chunk)
        used += cost
    return sorted(chosen, key=lambda c: c.index)
