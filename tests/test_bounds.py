"""Bounds on what one request may cost the daemon or its client, whatever it holds: image decoding (memory,
and the size the decoder really reads), document ranking (work), a session's history (memory and what a
cloud turn uploads), and the client's reading of a file to attach. Real OpenCV, real files, real threads;
the daemon-level checks are in test_private.py."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from locod.client import attachment
from locod.daemon import attachments as att
from locod.daemon import documents, images
from locod.daemon.config import AttachmentsConfig
from locod.daemon.conversations import Conversations
from locod.daemon.decode_budget import DecodeBudget
from locod.daemon.sessions import WITHHELD, SessionStore, TurnTrail
from locod.errors import AttachmentError, Busy
from locod.protocol import Attachment

TRAIL = TurnTrail("local", (), "chat")
ANSWERED = threading.Event()  # a turn that has answered: it holds its session no longer
ANSWERED.set()


def jpeg(side: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.zeros((side, side), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 10])
    assert ok
    return bytes(buf)


def disguised_jpeg(side: int) -> bytes:
    """The report's F16 file: ``FF 00`` and a fake 100x100 frame inside an APP1 segment ahead of the real
    frame. A reader that takes ``FF 00`` for a segment lands on the fake; libjpeg skips it as garbage."""
    real = jpeg(side)
    fake_sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 100, 100, 1) + b"\x01\x11\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(fake_sof)) + fake_sof
    return b"\xff\xd8" + b"\xff\x00\x00\x06" + app1 + real[2:]


def rle_bmp(side: int) -> bytes:
    """The report's F3 bitmap: an 8-bit RLE BMP of ``side`` x ``side`` pixels whose pixel data is just the
    end-of-bitmap code, about a kilobyte that decodes to ``3 * side**2`` bytes."""
    palette = b"\x00\x00\x00\x00" * 256
    pixels = b"\x00\x01"  # end of bitmap
    offset = 14 + 40 + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + palette + pixels


def image(data: bytes, name: str = "x.jpg") -> Attachment:
    return Attachment("image", name, data=data)


def test_a_jpeg_is_measured_as_libjpeg_reads_it() -> None:
    data = disguised_jpeg(3000)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8).shape == (375, 375)
    assert images.image_size(data) == ("jpeg", 3000, 3000)  # the frame the decoder uses, not the fake one
    config = AttachmentsConfig(image_max_pixels=1_000_000)
    with pytest.raises(AttachmentError, match=r"image 'x\.jpg': 3000x3000 pixels is outside the accepted size"):
        att.prepare(image(data), data, set(), config)
    small = disguised_jpeg(600)  # within the limit, the same file shape still decodes and is accepted
    assert att.prepare(image(small), small, set(), config).width == 600


def test_images_past_the_decode_budget_are_refused_before_decoding() -> None:
    bomb = rle_bmp(10_000)
    assert len(bomb) < 1200 and images.image_size(bomb) == ("bmp", 10_000, 10_000)
    with pytest.raises(AttachmentError, match=r"image 'rle\.bmp': decoding its 10000x10000 pixels takes about"):
        att.prepare(image(bomb, "rle.bmp"), bomb, set(), AttachmentsConfig(decode_mb=256))
    assert att.DECODES.used == 0  # refused before it held any memory
    with pytest.raises(AttachmentError, match="outside the accepted size"):  # the pixel limit, from the header
        att.prepare(image(bomb, "rle.bmp"), bomb, set(), AttachmentsConfig(image_max_pixels=50_000_000))
    ok, png = cv2.imencode(".png", np.zeros((3000, 3000), np.uint8))  # one colour: a few kB, 54 MB decoded
    assert ok and len(png) < 50_000
    with pytest.raises(AttachmentError, match=r"image 'black\.png': decoding its 3000x3000 pixels takes about 51 MiB"):
        att.prepare(image(bytes(png), "black.png"), bytes(png), set(), AttachmentsConfig(decode_mb=16))
    fine = rle_bmp(2000)
    prepared = att.prepare(image(fine, "fine.bmp"), fine, set(), AttachmentsConfig())
    assert (prepared.width, prepared.height) == (1024, 1024)


def test_concurrent_decodes_share_one_budget() -> None:
    budget, inside, peak = DecodeBudget(), [0], [0]
    lock = threading.Lock()

    def decode() -> None:
        with budget.hold(600, 1000):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=decode) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 1 and budget.used == 0  # two 600-byte decodes never held a 1000-byte budget at once
    cancelled = threading.Event()
    with budget.hold(900, 1000):  # a waiting decode whose turn is cancelled stops waiting
        cancelled.set()
        with pytest.raises(Busy, match="cancelled"), budget.hold(200, 1000, cancelled):
            pass
    assert budget.used == 0


def test_ranking_work_is_capped_before_it_starts() -> None:
    prompt_terms = {f"w{i:06d}" for i in range(30_000)}
    pieces = documents.chunk_text("lorem ipsum dolor sit amet\n\n" * 20_000, 1200)
    assert documents.chunk_text("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]  # a long paragraph, by index
    kept = documents.ranking_terms(prompt_terms, len(pieces))
    assert len(kept) >= 1 and len(kept) * len(pieces) <= documents.RANK_SEARCHES
    assert documents.ranking_terms({"a", "bb"}, 1) == ["bb", "a"]  # all of them when they fit, longest first
    assert documents.ranking_terms(prompt_terms, 10**9) == ["w000000"]  # at least one
    ranked = documents.rank_chunks(["the warranty ends", "nothing here"], {"warranty", "zzz"}, searches=2)
    assert ranked[0].index == 0 and ranked[0].score > 0  # one chunk, the longest term: still ranks
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Busy, match="cancelled"):
        documents.rank_chunks(pieces, prompt_terms, cancelled=cancelled)


def test_session_history_is_bounded_and_keeps_private_marks() -> None:
    store = SessionStore(idle_s=600, max_sessions=10, max_chars=1000)
    session = store.open("s", "ipc")
    store.record(session, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q0"}], "a0", TRAIL)
    store.record(session, [{"role": "user", "content": "secret?"}], "the code is 42", TRAIL, private=True)
    assert session.withheld == 1 and len(session.messages) == 5  # within the bound: the system prompt stays
    assert session.shareable()[-1] == {"role": "assistant", "content": WITHHELD}
    assert session.messages[-1]["content"] == "the code is 42"  # the local model still sees it
    for i in range(50):
        store.record(session, [{"role": "user", "content": "u" * 150}], f"answer {i} " + "x" * 100, TRAIL)
        assert sum(len(m["content"]) for m in session.messages) <= 1000
        assert session.messages[0]["role"] == ("user" if session.dropped else "system")
    assert session.messages[0]["role"] == "user"  # trimmed, the kept history starts at a user message
    assert session.withheld == 0 and session.messages[-1]["content"].startswith("answer 49")
    assert session.dropped + len(session.messages) == 5 + 100  # dropped from the front, counted
    huge = "h" * 5000  # one turn over the bound on its own leaves no history
    store.record(session, [{"role": "user", "content": huge}], "ok", TRAIL)
    assert session.messages == []


def test_a_trimmed_session_still_continues_its_http_conversation() -> None:
    store = SessionStore(idle_s=600, max_sessions=10, max_chars=300)
    conversations = Conversations(store, limit=10)
    conversation: list[dict[str, str]] = []
    session_id = None
    for i in range(10):
        conversation.append({"role": "user", "content": f"question {i} " + "q" * 60})
        sid, new = conversations.continuing(conversation, session_id, ANSWERED)
        if session_id is not None:
            assert sid == session_id and new == conversation[-1:]  # only what the session does not hold
        session_id = sid
        assert sid is not None
        store.record(store.open(sid, "http"), new, f"answer {i} " + "a" * 60, TRAIL)
        conversation.append({"role": "assistant", "content": f"answer {i} " + "a" * 60})
        conversations.answered(conversation[:-1], conversation[-1]["content"], sid)
    assert store.open(session_id, "http").dropped > 0


def test_the_client_checks_a_file_before_reading_it(tmp_path: Path) -> None:
    small = tmp_path / "notes.md"
    small.write_text("hello")
    assert attachment(small).data == b"hello"
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(6 << 30)  # sparse: 6 GiB that would be read whole
    with pytest.raises(AttachmentError, match="over the 1000-byte attachment limit") as caught:
        attachment(big, max_bytes=1000)
    assert caught.value.code == "attachment_too_large"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(AttachmentError, match="not a regular file") as caught:
            attachment(special)  # refused at once: neither hangs nor reads without end
        assert caught.value.code == "bad_path"
