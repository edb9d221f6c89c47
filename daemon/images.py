"""The pixels of an attached image: sniffed, decoded, laid on white, turned upright and re-encoded.

Images are sniffed (format, dimensions, completeness) from their header before a pixel is decoded (a
JPEG's markers walked as libjpeg walks them, so the size checked is the size decoded), and the memory a
decode takes is estimated from it, so a small file that decodes to hundreds of megabytes is refused or waits
(daemon/decode_budget.py) before OpenCV reads it. The decoded pixels are laid on white where transparent,
turned upright as their EXIF says and re-encoded as JPEG under a byte budget.
"""

from __future__ import annotations

import base64
import math
import struct

import cv2
import numpy as np

from locod.errors import AttachmentError
from locod.filekinds import READABLE_FORMATS, READABLE_IMAGES, image_format

DECODE_BYTES_PER_PIXEL = 6  # OpenCV's peak while decoding to BGR, measured for PNG, BMP and JPEG
# An image with transparency is decoded with its alpha channel (4 samples of up to 2 bytes) beside the BGR
# image it is laid on (``on_white``), a band of BAND_PIXELS at a time whose float samples and blend take
# BAND_BYTES_PER_PIXEL (measured; a megapixel band took 50 MB, more than a 3-megapixel image's estimate).
ALPHA_BYTES_PER_PIXEL = 8
BAND_PIXELS = 1 << 18
BAND_BYTES_PER_PIXEL = 48
# The size of OS/2's bitmap header (BITMAPCOREHEADER), whose sides are 16-bit: read as the 32-bit sides of
# every later header, a 40x30 bitmap was refused as 1966120x1572865 pixels (OpenCV decodes it)
BMP_CORE_HEADER = 12
BMP_BITFIELDS = (3, 6)  # BI_BITFIELDS, BI_ALPHABITFIELDS: compressions whose masks may say where alpha is
COEFFICIENT_BYTES = 2  # a progressive JPEG's decoder keeps every DCT coefficient, whatever the output scale
# Scans a JPEG may have: a progressive one has about 10, and libjpeg goes over the whole image once per scan,
# so 5,000 scans of 30 bytes each make a 250 kB file that takes minutes to decode.
MAX_JPEG_SCANS = 100


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
        core = int.from_bytes(data[14:18], "little") == BMP_CORE_HEADER
        w, h = struct.unpack("<HH", data[18:22]) if core else struct.unpack("<ii", data[18:26])
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


def encode_under(pixels: np.ndarray, budget: int, where: str) -> bytes:
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


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
