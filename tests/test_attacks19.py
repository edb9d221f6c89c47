"""Attack round 19: files that exercise the attachment code. A grayscale PNG whose ``tRNS`` makes one gray
transparent (as oxipng writes a black-on-transparent logo) and a palette PNG whose text chunk holds the word
"IDAT" before its ``tRNS`` both reached the cloud black where transparent, and so did a 32-bit BMP with an
alpha mask (as OpenCV writes one); a transparent PNG or WebP whose EXIF says it was taken turned reached it on
its side (OpenCV turns only what it decodes without alpha); a transparent megapixel PNG took 73 MiB to lay
on white, estimated at 14 (its blend's float samples were not counted); a UTF-32 file (its mark begins
with UTF-16's) and a UTF-16 file without a byte-order mark were both refused as "binary data, not text";
a LaTeX note whose first line is the comment "%PDF settings" was refused as "a PDF".
One real daemon (the embedded model) with the loopback cloud behind the recording proxy serves every test."""

from __future__ import annotations

import base64
import json
import struct
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from .conftest import CloudServer
from .test_seventeenth_walk import ask, cloud_walk, last_question, sent_image

SIDE = 64


@pytest.fixture(scope="module")
def walk(cloud_server: CloudServer, tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Any]:
    """(daemon, proxy, HTTP port): every turn goes to the cloud, with the least decode memory it takes."""

    def shape(config: dict[str, Any]) -> None:
        config["attachments"] = {"decode_mb": 16}

    with cloud_walk(cloud_server, tmp_path_factory.mktemp("attacks19"), models_dir, shape) as walked:
        yield walked


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png(colour_type: int, depth: int, row: bytes, *chunks: bytes) -> bytes:
    """A SIDE x SIDE PNG, every row ``row``, with ``chunks`` between its header and its pixels."""
    header = struct.pack(">IIBBBBB", SIDE, SIDE, depth, colour_type, 0, 0, 0)
    pixels = zlib.compress((b"\x00" + row) * SIDE)
    body = chunk(b"IHDR", header) + b"".join(chunks) + chunk(b"IDAT", pixels)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


HALF = SIDE // 2
LOGOS = {
    # gray 0 is transparent: the left half; the right half is opaque gray 60
    "gray8": png(0, 8, bytes(HALF) + bytes([60]) * HALF, chunk(b"tRNS", b"\x00\x00")),
    "gray16": png(0, 16, bytes(2 * HALF) + b"\x3c\x00" * HALF, chunk(b"tRNS", b"\x00\x00")),
    "gray2": png(0, 2, bytes(HALF // 4) + b"\x55" * (HALF // 4), chunk(b"tRNS", b"\x00\x00")),  # 1 of 3: 85
    # palette: entry 0 black and transparent, entry 1 dark red and opaque; a comment names "IDAT" first
    "palette": png(
        3,
        8,
        bytes(HALF) + b"\x01" * HALF,
        chunk(b"tEXt", b"Comment\x00written before IDAT"),
        chunk(b"PLTE", b"\x00\x00\x00\x80\x00\x00"),
        chunk(b"tRNS", b"\x00"),
    ),
}


@pytest.mark.parametrize("name", list(LOGOS))
def test_a_logo_transparent_by_trns_reaches_the_cloud_on_white(walk: Any, tmp_path: Path, name: str) -> None:
    daemon, proxy, _ = walk
    (tmp_path / "logo.png").write_bytes(LOGOS[name])
    done = ask(daemon, "--attach", str(tmp_path / "logo.png"))
    assert done.returncode == 0, done.stderr
    seen = sent_image(proxy)
    assert seen[SIDE // 2, 4].min() > 240, seen[SIDE // 2, 4]  # transparent: white, not black
    assert seen[SIDE // 2, SIDE - 4].max() < 160, seen[SIDE // 2, SIDE - 4]  # the opaque half kept


def test_a_transparent_bitmap_reaches_the_cloud_on_white_and_one_without_alpha_written_opaque(
    walk: Any, tmp_path: Path
) -> None:
    """A bitmap whose alpha mask holds 0 everywhere (tools write the mask and no alpha) is shown opaque, as
    browsers show it, rather than as a blank white page."""
    daemon, proxy, _ = walk
    pixels = np.zeros((SIDE, SIDE, 4), np.uint8)
    pixels[:, HALF:] = (0, 0, 128, 255)  # the left half transparent black, the right half opaque dark red
    (tmp_path / "logo.bmp").write_bytes(cv2.imencode(".bmp", pixels)[1].tobytes())
    assert ask(daemon, "--attach", str(tmp_path / "logo.bmp")).returncode == 0
    seen = sent_image(proxy)
    assert seen[HALF, 4].min() > 240 and seen[HALF, SIDE - 4][2] < 160, (seen[HALF, 4], seen[HALF, SIDE - 4])
    pixels[..., 3] = 0
    (tmp_path / "logo.bmp").write_bytes(cv2.imencode(".bmp", pixels)[1].tobytes())
    assert ask(daemon, "--attach", str(tmp_path / "logo.bmp")).returncode == 0
    seen = sent_image(proxy)
    assert seen[HALF, 4].max() < 15 and seen[HALF, SIDE - 4][2] < 160, (seen[HALF, 4], seen[HALF, SIDE - 4])


# EXIF whose one entry, Orientation, says 6: the stored pixels are to be turned a quarter clockwise.
TURNED = b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"


def with_exif(fmt: str, image: bytes) -> bytes:
    """``image`` (a PNG, or a 2 SIDE x SIDE WebP) with the EXIF block TURNED."""
    if fmt == "png":
        at = image.find(b"IDAT") - 4
        return image[:at] + chunk(b"eXIf", TURNED) + image[at:]
    chunks, flags = image[12:], 0x08  # the extended header says it has EXIF
    if chunks[:4] == b"VP8X":
        chunks, flags = chunks[18:], flags | chunks[8]
    size = (2 * SIDE - 1).to_bytes(3, "little") + (SIDE - 1).to_bytes(3, "little")
    header = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + size
    body = b"WEBP" + header + chunks + b"EXIF" + struct.pack("<I", len(TURNED)) + TURNED
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_a_transparent_image_taken_turned_reaches_the_cloud_upright(walk: Any, tmp_path: Path, fmt: str) -> None:
    """Upright as its opaque twin is (OpenCV turns that one itself) and as a browser shows it."""
    daemon, proxy, _ = walk
    pixels = np.zeros((SIDE, 2 * SIDE, 4), np.uint8)  # stored wide: its top half transparent, its bottom opaque
    pixels[HALF:] = (0, 0, 128, 255)
    params = [cv2.IMWRITE_WEBP_QUALITY, 90] if fmt == "webp" else []
    for alpha in (pixels, pixels[..., :3]):
        (tmp_path / f"shot.{fmt}").write_bytes(with_exif(fmt, cv2.imencode(f".{fmt}", alpha, params)[1].tobytes()))
        assert ask(daemon, "--attach", str(tmp_path / f"shot.{fmt}")).returncode == 0
        seen = sent_image(proxy)
        assert seen.shape[:2] == (2 * SIDE, SIDE), seen.shape  # turned a quarter: tall
        assert seen[SIDE, 4][2] > 100 and seen[SIDE, 4][0] < 60, seen[SIDE, 4]  # its bottom is now its left
        if alpha is pixels:
            assert seen[SIDE, SIDE - 4].min() > 240, seen[SIDE, SIDE - 4]


def test_the_http_door_lays_a_gray_logo_on_white(walk: Any) -> None:
    """The same decode serves the HTTP door's images: a data URL of the gray logo reaches the cloud white
    where it is transparent."""
    _, proxy, port = walk
    url = "data:image/png;base64," + base64.b64encode(LOGOS["gray8"]).decode()
    parts = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": parts}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        assert reply.status == 200
    seen = sent_image(proxy)
    assert seen[HALF, 4].min() > 240 and seen[HALF, SIDE - 4].max() < 160, (seen[HALF, 4], seen[HALF, SIDE - 4])


def test_laying_an_image_on_white_counts_against_decode_mb(walk: Any, tmp_path: Path) -> None:
    """A transparent 1024 x 1024 PNG was estimated at 14 MiB and so decoded under a 16 MiB budget; laying
    it on white a megapixel band at a time took 73 MiB. Its blend (now a quarter-megapixel band at a time)
    is counted: about 26 MiB, more than the budget, and the refusal names the key."""
    daemon, _, _ = walk
    pixels = np.zeros((1024, 1024, 4), np.uint8)
    pixels[::3] = 255
    (tmp_path / "big.png").write_bytes(cv2.imencode(".png", pixels)[1].tobytes())
    refused = ask(daemon, "--attach", str(tmp_path / "big.png"))
    assert refused.returncode == 1, refused
    assert "takes about 26 MiB, more than attachments.decode_mb (16 MiB)" in refused.stderr, refused.stderr
    (tmp_path / "opaque.png").write_bytes(cv2.imencode(".png", pixels[..., :3])[1].tobytes())
    assert ask(daemon, "--attach", str(tmp_path / "opaque.png")).returncode == 0  # 6 MiB: no blend


NOTE = "Meeting notes: the budget is 4200 euros.\nNext meeting on Friday.\n"


@pytest.mark.parametrize("encoding", ["utf-32", "utf-32-be"])
def test_a_utf32_text_file_is_read(walk: Any, tmp_path: Path, encoding: str) -> None:
    daemon, proxy, _ = walk
    data = NOTE.encode(encoding)
    if encoding == "utf-32-be":
        data = b"\x00\x00\xfe\xff" + data
    (tmp_path / "notes.txt").write_bytes(data)
    done = ask(daemon, "--attach", str(tmp_path / "notes.txt"))
    assert done.returncode == 0, done.stderr
    assert "the budget is 4200 euros" in str(last_question(proxy))


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_byte_order_mark_is_named_as_such(walk: Any, tmp_path: Path, encoding: str) -> None:
    daemon, proxy, _ = walk
    (tmp_path / "notes.txt").write_bytes(NOTE.encode(encoding))
    before = len(proxy.chat_requests())
    refused = ask(daemon, "--attach", str(tmp_path / "notes.txt"))
    assert refused.returncode == 1, refused
    assert "UTF-16 text without a byte-order mark" in refused.stderr, refused.stderr
    assert len(proxy.chat_requests()) == before
    (tmp_path / "blob.bin").write_bytes(b"\x00\x00\x00ab" * 200)  # UTF-8 with NULs, and not UTF-16 text
    refused = ask(daemon, "--attach", str(tmp_path / "blob.bin"))
    assert refused.returncode == 1 and "binary data, not text" in refused.stderr, refused.stderr


def test_a_note_that_begins_with_a_pdf_comment_is_read(walk: Any, tmp_path: Path) -> None:
    daemon, proxy, _ = walk
    (tmp_path / "build.tex").write_text("%PDF settings for pdflatex\n\\pdfminorversion=7\n")
    done = ask(daemon, "--attach", str(tmp_path / "build.tex"))
    assert done.returncode == 0, done.stderr
    assert "pdfminorversion=7" in str(last_question(proxy))
