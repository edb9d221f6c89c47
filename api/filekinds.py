"""What a file is, from its first bytes: the client decides from them whether it attaches an image or a
document, and the daemon names what it refuses ("a HEIC image", "a PDF") rather than calling a photo a
document that is not text. One table for both, so they never disagree about a format."""

from __future__ import annotations

READABLE_FORMATS = ("PNG", "JPEG", "WebP", "BMP")  # what the daemon decodes (daemon/images.py)
READABLE_IMAGES = f"{', '.join(READABLE_FORMATS[:-1])} or {READABLE_FORMATS[-1]}"  # in words, for refusals

# ISO base media files (HEIF, AVIF) say what they hold in their `ftyp` box's brand.
HEIF_BRANDS = frozenset((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"))
AVIF_BRANDS = frozenset((b"avif", b"avis"))
IMAGE_SIGNATURES = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),  # with its reserved zeros (below): text may begin "BM", and has no NUL bytes
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
)
# Files people attach as documents that are not text: what to tell them instead of "not UTF-8".
BINARY_DOCUMENTS = (
    (b"%PDF-", "a PDF"),  # with its version: a note may begin "%PDF" (a LaTeX comment)
    (b"PK\x03\x04", "a ZIP archive (a .docx, .xlsx, .pptx, .odt or .zip file is one)"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file (.doc, .xls, .ppt)"),
)


def image_format(data: bytes) -> str | None:
    """The image format ``data`` begins with, whether the daemon reads it or not; None: not an image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return "HEIC" if brand in HEIF_BRANDS else "AVIF" if brand in AVIF_BRANDS else None
    if data.startswith(b"BM") and data[6:10] != b"\x00\x00\x00\x00":
        return None
    return next((name for signature, name in IMAGE_SIGNATURES if data.startswith(signature)), None)


def binary_kind(data: bytes) -> str | None:
    """What a file that is not text is, in words ("a PDF", "a GIF image"), when its first bytes say it."""
    if fmt := image_format(data):
        return f"a {fmt} image"
    return next((kind for signature, kind in BINARY_DOCUMENTS if data.startswith(signature)), None)
