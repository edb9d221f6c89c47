"""Attachments of a turn: checked, made ready to upload, and scored for relevance to the prompt.

Images are sniffed (format, dimensions, completeness) from their header before a pixel is decoded (a
JPEG's markers walked as libjpeg walks them, so the size checked is the size decoded), then decoded with
OpenCV within one memory budget shared by all turns (daemon/decode_budget.py), checked to be the size the
header said, laid on white where transparent, downscaled to a longest side, turned upright as its EXIF says
and re-encoded as JPEG under a byte budget. Documents (text in UTF-8, or UTF-16 or UTF-32 with a byte-order
mark) are split into chunks ranked by term overlap with the prompt, a bounded number of term searches per
document. Every attachment gets a
relevance score in [0, 1]: TMO's "association" signal, which the decision uses.
"""

from __future__ import annotations

import base64
import codecs
import functools
import math
import re
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from locod.daemon.config import AttachmentsConfig
from locod.daemon.decode_budget import DecodeBudget
from locod.daemon.safe_open import over_limit, read_allowed
from locod.errors import AttachmentError, Busy
from locod.filekinds import READABLE_FORMATS, READABLE_IMAGES, binary_kind, image_format
from locod.policy.rule import CHARS_PER_TOKEN, MIN_RELEVANCE, estimate_tokens
from locod.protocol import Attachment

WORD = re.compile(r"[a-z0-9]+")
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # a document that begins with one is UTF-16 text
# UTF-32's little-endian mark begins with UTF-16's: looked for first (U+0000 is no text's first character).
UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
# Term searches (prompt term x chunk) a document's ranking may make: a long prompt against a long document
# uses its longest terms only, so ranking stays within milliseconds to a second whatever the sizes.
RANK_SEARCHES = 200_000
DECODE_BYTES_PER_PIXEL = 6  # OpenCV's peak while decoding to BGR, measured for PNG, BMP and JPEG
# An image with transparency is decoded with its alpha channel (4 samples of up to 2 bytes) beside the BGR
# image it is laid on (``on_white``), a band of BAND_PIXELS at a time whose float samples and blend take
# BAND_BYTES_PER_PIXEL (measured; a megapixel band took 50 MB, more than a 3-megapixel image's estimate).
ALPHA_BYTES_PER_PIXEL = 8
BAND_PIXELS = 1 << 18
BAND_BYTES_PER_PIXEL = 48
BMP_BITFIELDS = (3, 6)  # BI_BITFIELDS, BI_ALPHABITFIELDS: compressions whose masks may say where alpha is
COEFFICIENT_BYTES = 2  # a progressive JPEG's decoder keeps every DCT coefficient, whatever the output scale
# Scans a JPEG may have: a progressive one has about 10, and libjpeg goes over the whole image once per scan,
# so 5,000 scans of 30 bytes each make a 250 kB file that takes minutes to decode.
MAX_JPEG_SCANS = 100
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
    return {w for w in WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1}


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


def check_cancelled(cancelled: threading.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise Busy("the turn was cancelled while its attachments were prepared", code="cancelled")


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
        width, height, _ = jpeg_frame(data)
        # FF DA starts a scan: entropy-coded data never holds it (an FF there is followed by 00 or a restart)
        if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise AttachmentError(
                f"JPEG has {scans} scans, more than {MAX_JPEG_SCANS} (decoding goes over the image once per scan)",
                code="bad_image",
            )
        return "jpeg", width, height
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
    if (known := image_format(data)) in READABLE_FORMATS:  # its header is cut short or not one decoded here
        raise AttachmentError(f"its {known} header is cut short or unreadable", code="bad_image")
    if known is not None:
        raise AttachmentError(
            f"not a supported image: it is a {known} image; locod reads {READABLE_IMAGES} (convert it to one of them)",
            code="bad_image",
        )
    raise AttachmentError(f"not a supported image ({READABLE_IMAGES})", code="bad_image")


SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC9, 0xCA))  # the frames libjpeg decodes (the rest it refuses)
PROGRESSIVE = frozenset((0xC2, 0xCA))
STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM, RST0-7: no length


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """(width, height, bytes per pixel the decoder keeps beside its output: 0, or a progressive frame's
    coefficients) of the frame libjpeg decodes. Markers are found as libjpeg's ``next_marker`` finds them:
    bytes before a 0xFF are skipped, 0xFF fill bytes too, and ``FF 00`` is no marker; so a header crafted to
    show a small frame to a looser reader cannot hide the large one the decoder uses."""
    i, n = 2, len(data)
    while True:
        while i < n and data[i] != 0xFF:
            i += 1
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker, i = data[i], i + 1
        if marker == 0x00 or marker in STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # a second SOI, or EOI or SOS before any frame: libjpeg refuses it
            break
        if i + 2 > n or (length := struct.unpack(">H", data[i : i + 2])[0]) < 2:
            break
        if marker in SOF_MARKERS:
            if length < 8 or i + 8 > n:
                break
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            kept = COEFFICIENT_BYTES * data[i + 7] if marker in PROGRESSIVE else 0
            return width, height, kept
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xCC):
            raise AttachmentError("JPEG frame type is not supported (lossless, hierarchical)", code="bad_image")
        i += length
    raise AttachmentError("JPEG has no frame header", code="bad_image")


def decode_bytes(fmt: str, data: bytes, width: int, height: int, factor: int, alpha: bool) -> int:
    """About the memory decoding takes at 1/``factor`` scale (JPEG only), at its peak; ``alpha``: read
    with its alpha channel (``has_alpha``)."""
    pixels = math.ceil(width / factor) * math.ceil(height / factor)
    out = pixels * DECODE_BYTES_PER_PIXEL
    if alpha:
        out += pixels * ALPHA_BYTES_PER_PIXEL + min(pixels, BAND_PIXELS) * BAND_BYTES_PER_PIXEL
    return out + (width * height * jpeg_frame(data)[2] if fmt == "jpeg" else 0)


def has_alpha(fmt: str, data: bytes) -> bool:
    """Whether the header says the image has transparency: a PNG with an alpha channel or a ``tRNS`` chunk
    (before its pixels), a WebP whose header flags alpha, a 32-bit BMP whose V4 or V5 header has an alpha
    mask (as OpenCV and Windows write a transparent bitmap). JPEG is opaque."""
    if fmt == "png":
        return data[25:26] in (b"\x04", b"\x06") or png_trns(data) is not None
    if fmt == "webp":
        chunk = data[12:16]
        if chunk == b"VP8X":
            return bool(data[20] & 0x10)
        return chunk == b"VP8L" and bool(int.from_bytes(data[21:25], "little") >> 28 & 1)
    if fmt == "bmp" and len(data) >= 70:
        header, bits, compression = struct.unpack("<I10xHI", data[14:34])
        return header >= 56 and bits == 32 and compression in BMP_BITFIELDS and data[66:70] != bytes(4)
    return False


def png_trns(data: bytes) -> bytes | None:
    """A PNG's ``tRNS`` chunk (what it makes transparent), found by walking the chunks before its pixels
    by their lengths: the bytes "IDAT" or "tRNS" in a text chunk's words are neither chunk. One after the
    pixels is out of place, and libpng ignores it."""
    i = 8
    while i + 8 <= len(data) and (kind := data[i + 4 : i + 8]) != b"IDAT":
        length = int.from_bytes(data[i : i + 4], "big")
        if kind == b"tRNS":
            return data[i + 8 : i + 8 + length]
        i += 12 + length
    return None


def transparent_gray(fmt: str, data: bytes) -> int | None:
    """The sample a grayscale PNG's ``tRNS`` makes transparent, as OpenCV decodes it (depths under 8 bits
    scaled up to 8): OpenCV reads such an image as gray alone, without that transparency (an optimiser such
    as oxipng writes a black-on-transparent logo so)."""
    if fmt != "png" or data[25:26] != b"\x00" or (trns := png_trns(data)) is None or len(trns) < 2:
        return None
    depth, value = data[24], int.from_bytes(trns[:2], "big")
    return value * (255 // ((1 << depth) - 1)) if depth < 8 else value


def decode(data: bytes, flag: int, alpha: bool) -> tuple[np.ndarray | None, int]:
    """The pixels OpenCV decodes, and the EXIF orientation left to apply (``upright``): OpenCV turns an
    image (a JPEG, or a PNG or WebP with EXIF) upright itself unless it reads the alpha channel, so a
    transparent screenshot taken on a turned phone reached the cloud on its side."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if not alpha:
        return cv2.imdecode(buf, flag), 1
    pixels, kinds, blocks = cv2.imdecodeWithMetadata(buf, flags=flag)
    exif = next((np.asarray(b).tobytes() for k, b in zip(np.ravel(kinds), blocks) if k == cv2.IMAGE_METADATA_EXIF), b"")
    return pixels, exif_orientation(exif)


def exif_orientation(exif: bytes) -> int:
    """The Orientation tag (0x0112) of an EXIF block's first directory, 1 to 8; 1 (as stored) without one."""
    exif = exif.removeprefix(b"Exif\x00\x00")
    order = {b"II": "<", b"MM": ">"}.get(exif[:2])
    if order is None or len(exif) < 8:
        return 1
    start = struct.unpack(order + "I", exif[4:8])[0] + 2
    entries = struct.unpack(order + "H", exif[start - 2 : start])[0] if start <= len(exif) else 0
    for i in range(start, min(start + 12 * entries, len(exif) - 11), 12):
        tag, _, _, value = struct.unpack(order + "HHIH", exif[i : i + 10])
        if tag == 0x0112:
            return value if value in TURNS else 1
    return 1


# What each EXIF orientation takes to be upright, as OpenCV turns what it decodes: (transpose, flip code).
TURNS: dict[int, tuple[bool, int | None]] = {
    1: (False, None),
    2: (False, 1),
    3: (False, -1),
    4: (False, 0),
    5: (True, None),
    6: (True, 1),
    7: (True, -1),
    8: (True, 0),
}


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` turned as their EXIF ``orientation`` says."""
    transpose, flip = TURNS[orientation]
    pixels = cv2.transpose(pixels) if transpose else pixels
    return pixels if flip is None else cv2.flip(pixels, flip)


def blank_alpha_dropped(fmt: str, pixels: np.ndarray) -> np.ndarray:
    """A BMP whose alpha mask holds 0 at every pixel as opaque: tools write the mask and no alpha, and
    browsers show such a bitmap opaque (laid on white it would be blank)."""
    if fmt == "bmp" and pixels.ndim == 3 and pixels.shape[2] == 4 and not pixels[..., 3].any():
        return np.ascontiguousarray(pixels[..., :3])
    return pixels


def on_white(pixels: np.ndarray, transparent: int | None = None) -> np.ndarray:
    """A decoded image as 8-bit BGR: transparency laid on white, as a page shows it (its colour channels
    alone would show what the transparent pixels hold, often black: black text on a transparent screenshot
    would be black on black), 16-bit samples scaled, gray made BGR; a band of rows at a time, so the float
    arithmetic stays small whatever the image's size. ``transparent``: a gray image's sample that is
    transparent (``transparent_gray``)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    h, w, channels = pixels.shape
    if pixels.dtype == np.uint8 and channels == 3:
        return pixels
    top = float(np.iinfo(pixels.dtype).max)
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, BAND_PIXELS // max(1, w))
    for y in range(0, h, rows):
        band = pixels[y : y + rows].astype(np.float32)
        colour = band[:, :, :3] if channels >= 3 else np.repeat(band[:, :, :1], 3, axis=2)
        if channels in (2, 4):
            alpha = band[:, :, -1:] / top
            colour = colour * alpha + top * (1 - alpha)
        elif transparent is not None:
            colour[band[:, :, 0] == transparent] = top
        out[y : y + rows] = np.rint(colour * (255 / top)).astype(np.uint8)
    return out


def _prepare_image(
    attachment: Attachment,
    data: bytes,
    prompt_terms: set[str],
    config: AttachmentsConfig,
    cancelled: threading.Event | None,
) -> PreparedAttachment:
    where = f"image {attachment.name!r}"
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
    longest = max(width, height)
    # Transparency is read with the alpha channel (OpenCV then leaves the EXIF turn to us: ``decode``).
    # Asked once: a PNG's chunks are walked in Python, 20 MB of empty chunks in about a second.
    alpha = has_alpha(fmt, data)
    flag, factor = (cv2.IMREAD_UNCHANGED if alpha else cv2.IMREAD_COLOR), 1
    # JPEG can decode at 1/2, 1/4, 1/8 scale directly: far cheaper than decoding 12 MP then shrinking.
    if fmt == "jpeg":
        for scale, reduced in (
            (8, cv2.IMREAD_REDUCED_COLOR_8),
            (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2),
        ):
            if longest // scale >= config.image_max_side:
                flag, factor = reduced, scale
                break
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
    scale = config.image_max_side / max(h, w)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    pixels = upright(pixels, orientation)  # once shrunk: turning it copies it
    jpeg = _encode_under(pixels, config.image_jpeg_bytes, where)
    h, w = pixels.shape[:2]
    name_terms = terms(Path(attachment.name).stem.replace("_", " ").replace("-", " "))
    overlap = len(name_terms & prompt_terms) / max(1, len(name_terms))
    cue = 1.0 if prompt_terms & IMAGE_CUES else 0.0
    relevance = min(1.0, IMAGE_BASE_RELEVANCE + 0.5 * cue + 0.5 * overlap)
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
    raise AttachmentError(
        f"{where}: cannot be encoded under {budget} bytes (attachments.image_jpeg_bytes)", code="bad_image"
    )


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
        raise AttachmentError(
            f"document {attachment.name!r} is {what}: locod reads UTF-8 text (or UTF-16 or UTF-32 with a "
            "byte-order mark) such as plain text, Markdown, CSV or code; convert it to text first",
            code="bad_document",
        )
    pieces = chunk_text(text, config.doc_chunk_chars)
    check_cancelled(cancelled)
    chunks = rank_chunks(pieces, prompt_terms, cancelled=cancelled)
    relevance = chunks[0].score if chunks else 0.0
    return PreparedAttachment(
        "document", attachment.name, attachment.private, relevance, len(data), chunks=tuple(chunks)
    )


def document_text(data: bytes) -> str | None:
    """A document's text: UTF-8 (its byte-order mark dropped), or UTF-16 or UTF-32 with a byte-order mark,
    as Windows tools write "Unicode" text; None when it is none of them."""
    try:
        if data.startswith(UTF32_BOMS):
            return data.decode("utf-32")
        if data.startswith(UTF16_BOMS):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def undecodable(data: bytes) -> str:
    """What a document ``document_text`` could not read is, in words: one whose byte-order mark says UTF-16
    was not "not UTF-8" to its user (a Unix tool's newline appended to a Windows file leaves an odd byte)."""
    for boms, name, unit, uneven in (
        (UTF32_BOMS, "UTF-32", 4, "not a multiple of 4 bytes"),
        (UTF16_BOMS, "UTF-16", 2, "an odd number of bytes"),
    ):
        if data.startswith(boms):
            odd = f", {uneven}" if len(data) % unit else ""
            return f"{name} text, by its byte-order mark, that does not decode (cut short or damaged{odd})"
    return "not UTF-8 text"


def nul_kind(data: bytes) -> str:
    """What a document whose text holds NUL characters is: UTF-16 text without a byte-order mark (every
    other byte zero, as Latin text is in UTF-16, and so "binary" to a UTF-8 reader), or binary data."""
    if len(data) % 2 == 0:
        for endian, zeros in (("little", data[1::2]), ("big", data[::2])):
            if zeros.count(0) > len(zeros) // 2 and "\x00" not in data.decode(f"utf-16-{endian[0]}e", "replace"):
                return f"UTF-16 text without a byte-order mark ({endian}-endian)"
    return "binary data, not text"


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def chunk_text(text: str, size: int) -> list[str]:
    """Paragraph-aligned chunks of about ``size`` characters (a long paragraph is cut at ``size``, by index:
    re-slicing the rest each time would copy a one-paragraph document quadratically). A paragraph keeps its
    first line's indentation: in code (a method after a blank line) it is meaning."""
    chunks: list[str] = []
    current = ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.rstrip().lstrip("\r\n")
        cut = max(0, (len(paragraph) - 1) // size) * size  # leaves the last 1 to ``size`` characters
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
    scored = [DocChunk(i, p, sum(weight[t] for t in ct) / total) for i, (p, ct) in enumerate(zip(pieces, chunk_terms))]
    return sorted(scored, key=lambda c: (-c.score, c.index))


def chunks_for(doc: PreparedAttachment, budgets: list[int]) -> tuple[DocChunk, ...]:
    """The chunks ``select_chunks`` picks at any of ``budgets``, and the one it cuts when none fits, in the
    document's order: of those alone it picks at each of those budgets what it picks of the whole document
    (its scan, in the same order, meets the same sums at each chunk it keeps), so a question waiting to be
    asked keeps them rather than the whole document."""
    candidates = _candidates(doc)
    kept = {chunk.index for budget in budgets for chunk in select_chunks(doc, budget)}
    kept.update(c.index for c in candidates[:1])  # the best one, cut to a budget too small for it
    return tuple(c for c in doc.chunks if c.index in kept)


def _candidates(doc: PreparedAttachment) -> list[DocChunk]:
    """The chunks an excerpt is chosen from, best first: those that share terms with the prompt, or when
    none does ("summarise this"), the document from its opening."""
    return [c for c in doc.chunks if c.score > 0] or sorted(doc.chunks, key=lambda c: c.index)


def select_chunks(doc: PreparedAttachment, token_budget: int) -> list[DocChunk]:
    """The best chunks that fit ``token_budget`` (tokens estimated from characters), back in document order.

    Only chunks that share terms with the prompt are sent; when none does ("summarise this"), the
    document's opening chunks are. A budget too small for any whole chunk gets the best one's beginning.
    """
    candidates = _candidates(doc)
    chosen, used = [], 0
    for chunk in candidates:
        cost = estimate_tokens(len(chunk.text)) + 1
        if used + cost > token_budget:
            continue
        chosen.append(chunk)
        used += cost
    if not chosen and candidates and (cut := max(0, token_budget - 1) * CHARS_PER_TOKEN):
        best = candidates[0]
        return [DocChunk(best.index, best.text[:cut], best.score)]
    return sorted(chosen, key=lambda c: c.index)
