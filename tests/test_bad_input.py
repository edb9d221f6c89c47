"""Hostile and broken requests against the running daemon: an error naming the problem, nothing recorded,
and the daemon keeps serving."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import attachment
from locod.errors import AttachmentError

from .conftest import DaemonHandle

LIMIT = 64 * 1024


@pytest.fixture
def small_daemon(daemon_factory: Any) -> DaemonHandle:
    return daemon_factory({"daemon": {"max_message_bytes": LIMIT}})  # type: ignore[no-any-return]


def raw_socket(handle: DaemonHandle) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(handle.endpoint)
    return sock


def exchange(sock: zmq.Socket[bytes], *frames: bytes, timeout_ms: int = 20_000) -> dict[str, Any]:
    sock.send_multipart(list(frames))
    assert sock.poll(timeout_ms), "no reply"
    return dict(json.loads(sock.recv()))


def msg(**fields: Any) -> bytes:
    return json.dumps({"v": 1, "id": "t", **fields}).encode()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ((b"\x00\x01garbage",), "invalid_json"),
        ((b'"just a string"',), "not_object"),
        ((msg(op="explode"),), "unknown_op"),
        ((json.dumps({"v": 2, "id": "t", "op": "ping"}).encode(),), "unsupported_version"),
        ((msg(op="chat", prompt=["not", "text"]),), "bad_field"),
        ((msg(op="chat"),), "bad_field"),
        ((msg(op="chat", prompt=""),), "empty_prompt"),
        ((msg(op="ping"), b"second frame"), "extra_frames"),
        ((msg(op="chat", prompt="x" * (LIMIT + 10)),), "too_large"),
        ((msg(op="feedback", decision=999, satisfied=True),), "unknown_decision"),
        ((msg(op="chat", prompt="hi", model="no-such-model"),), "unknown_model"),
        (
            (msg(op="chat", prompt="look", attachments=[{"kind": "image", "name": "x.png", "data": "aGVsbG8="}]),),
            "bad_image",
        ),
        (
            (msg(op="chat", prompt="read", attachments=[{"kind": "document", "path": "/etc/passwd"}]),),
            "path_not_allowed",
        ),
        # Issue #17: these used to end as `internal` (or worse, accepted and left pending).
        (
            (
                msg(
                    op="chat",
                    messages=[{"role": "user", "content": "a \ud800"}, {"role": "user", "content": "hi"}],
                    options={"force": "cloud"},
                ),
            ),
            "bad_request",
        ),
        ((msg(op="chat", prompt="hi", session="s\udc00"),), "bad_request"),
        ((msg(op="ping", **{"\udfff": 1}),), "bad_request"),
        (
            (b'{"v": 1, "id": "t", "op": "feedback", "decision": ' + b"9" * 5000 + b', "satisfied": true}',),
            "invalid_json",
        ),
        ((msg(op="feedback", decision=2**70, satisfied=True),), "bad_field"),
        ((msg(op="chat", prompt="hi", options={"seed": -(2**70)}),), "bad_field"),
        ((msg(op="chat", prompt="read", attachments=[{"kind": "document", "path": "/tmp/a\x00b"}]),), "bad_path"),
    ],
)
def test_bad_request_gets_a_named_error_and_nothing_is_written(
    small_daemon: DaemonHandle, frames: tuple[bytes, ...], code: str
) -> None:
    sock = raw_socket(small_daemon)
    reply = exchange(sock, *frames)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    assert small_daemon.rows() == []
    assert exchange(sock, msg(op="ping"))["data"]["pong"]  # still serving
    sock.close()


def test_prompt_longer_than_the_context_is_rejected_before_recording(small_daemon: DaemonHandle) -> None:
    sock = raw_socket(small_daemon)
    reply = exchange(sock, msg(op="chat", prompt="word " * 5000))
    assert reply["code"] == "prompt_too_long" and "context is 2048 tokens" in reply["message"]
    assert small_daemon.rows() == []
    sock.close()


def test_frame_far_over_the_limit_is_dropped_by_zeromq_and_the_daemon_lives(small_daemon: DaemonHandle) -> None:
    sock = raw_socket(small_daemon)
    sock.send(b"x" * (4 * LIMIT))  # over ZMQ_MAXMSGSIZE: the connection is dropped, no reply is possible
    assert not sock.poll(1000)
    sock.close()
    other = raw_socket(small_daemon)
    assert exchange(other, msg(op="ping"))["data"]["pong"]
    other.close()


def test_frame_over_the_limit_is_answered_with_its_id(small_daemon: DaemonHandle) -> None:
    sock = raw_socket(small_daemon)
    reply = exchange(sock, msg(op="chat", prompt="x" * (LIMIT + 10)))
    assert (reply["id"], reply["code"]) == ("t", "too_large")
    assert "daemon.max_message_bytes" in reply["message"]
    sock.close()


@pytest.mark.parametrize("size", [LIMIT, 4 * LIMIT])  # answered by the daemon / dropped by ZeroMQ unread
def test_attachment_too_large_for_a_message_is_refused_at_once_by_the_cli(
    small_daemon: DaemonHandle, tmp_path: Path, size: int
) -> None:
    """Walk finding: a 30 MB attachment (40 MB base64) left `locod ask` silent for 600 s, then asking
    whether the daemon runs. Now the client names the size and the key before it sends."""
    big = tmp_path / "video.bin"
    big.write_bytes(b"\x00" * size)
    started = time.monotonic()
    done = small_daemon.cli("ask", "what is this?", "--attach", str(big), timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 1, done.stderr
    assert "'video.bin'" in done.stderr and f"limit of {LIMIT} (daemon.max_message_bytes)" in done.stderr
    assert "is it running" not in done.stderr
    assert small_daemon.rows() == []
    assert small_daemon.client().ping()["pong"]


def test_attachment_over_attachments_max_bytes_is_refused_by_the_client(daemon_factory: Any, tmp_path: Path) -> None:
    handle = daemon_factory({"daemon": {"max_message_bytes": LIMIT}, "attachments": {"max_bytes": 8192}})
    notes = tmp_path / "notes.md"
    notes.write_text("word " * 4000)
    with pytest.raises(AttachmentError, match=r"'notes.md' is 20000 bytes, .* limit of 8192 \(attachments.max_bytes\)"):
        handle.client().ask("summarise", attachments=[attachment(notes)])
    assert handle.rows() == []


def test_client_disconnecting_mid_stream_cancels_its_turn(small_daemon: DaemonHandle) -> None:
    sock = raw_socket(small_daemon)
    sock.send(
        msg(op="chat", prompt="Tell a very long story about the sea.", options={"max_tokens": 1500, "temperature": 0.0})
    )
    first = json.loads(sock.recv())
    assert first["type"] == "decision"
    json.loads(sock.recv())  # the first delta: generation is under way
    sock.close(linger=0)
    client = small_daemon.client()

    def finished() -> bool:
        rows = small_daemon.rows()
        return bool(rows) and rows[0]["outcome"] != "pending"

    deadline = time.monotonic() + 60
    while not finished() and time.monotonic() < deadline:
        assert client.ping()["pong"]  # serving the others meanwhile
        time.sleep(0.1)
    (row,) = small_daemon.rows()
    assert (row["outcome"], row["error"], row["error_code"]) == ("cancelled", "the client disconnected", "cancelled")
    assert row["tokens_out"] < 1500
    assert client.ask("Still there?", max_tokens=3).done.outcome == "ok"


def test_many_bad_messages_then_a_good_one(small_daemon: DaemonHandle) -> None:
    sock = raw_socket(small_daemon)
    garbage = [
        b"",
        b"{",
        b"null",
        b"{}",
        msg(op=None),
        msg(op="chat", prompt="x", options="fast"),
        msg(op="chat", prompt="x", attachments="all"),
        json.dumps({"v": 1, "id": 5, "op": "ping"}).encode(),
    ]
    for frame in garbage * 20:
        assert exchange(sock, frame)["type"] == "error"
    good = small_daemon.client().ask("Hello", max_tokens=3)
    assert good.done.outcome == "ok"
    assert len(small_daemon.rows()) == 1
    sock.close()
