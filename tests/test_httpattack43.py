"""The HTTP door at the transport level, on a running daemon: requests whose body's length is ambiguous,
the OpenAI SDK's own retries of a turn that failed, and clients that never read their stream. Real daemon,
real sockets, real SDK (docs/http.md)."""

from __future__ import annotations

import json
import socket
from typing import Any

import openai
import pytest

from .conftest import cloud_config, wait_for
from .faultproxy import Fault, FaultProxy
from .test_escalation import CLOUD
from .test_http import http_daemon
from .test_slow36 import unread_health_checks

CHAT = b'{"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}'


def exchange(port: int, sent: bytes) -> bytes:
    """Send raw bytes on a connection of their own and read until the daemon closes it (or 30 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(sent)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            return got + b"<still open>"
        return got


def test_a_body_framed_by_both_content_length_and_transfer_encoding_is_refused_and_the_connection_closed(
    daemon_factory: Any,
) -> None:
    """A request naming both Content-Length and Transfer-Encoding: chunked was read as chunked and the
    connection kept alive, so a proxy in front that went by the Content-Length (some do) and the daemon
    disagreed on where the request ended: what the proxy took for one request's body, the daemon read as
    the next request on the connection (request smuggling). RFC 9112 (6.3) asks a server to close the
    connection after answering such a request; it is now refused, 400 ``bad_request``, and closed, and the
    rest on the connection is never read as a request."""
    handle, base = http_daemon(daemon_factory, request_timeout_s=120.0)
    port = int(base.rsplit(":", 1)[1])
    smuggled = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked + smuggled)
    )
    got = exchange(port, head + chunked + smuggled)
    assert got.startswith(b"HTTP/1.1 400 "), got[:200]
    assert got.count(b"HTTP/1.1 ") == 1 and not got.endswith(b"<still open>")  # one answer, then closed
    error = json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "bad_request" and "Transfer-Encoding" in error["message"]
    assert handle.rows() == []  # no turn was run for it
    # a chunked body alone, and a Content-Length alone, are served as ever
    for framing, body in ((b"Transfer-Encoding: chunked", chunked), (b"Content-Length: %d" % len(CHAT), CHAT)):
        plain = head.split(b"Content-Length")[0] + framing + b"\r\nConnection: close\r\n\r\n" + body
        assert exchange(port, plain).startswith(b"HTTP/1.1 200 ")


def test_the_sdk_does_not_run_a_failed_turn_again(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A turn that failed after it was decided and run (502: the cloud failed after the daemon's own
    ``cloud.max_retries``, and so did the local fallback) was run twice more by the OpenAI SDK, which retries
    any 5xx itself (``max_retries`` 2 by default): one question was three failed turns in ``locod decisions``
    and three times the daemon's own cloud attempts. Its answer now says ``x-should-retry: false``, which
    the SDKs obey; a refusal before any turn ran (429, 503) is still theirs to retry."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, max_retries=0))
    proxy.set(Fault(kind="status", status=500))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60)  # the SDK's own retries
    too_long_for_local: Any = [{"role": "user", "content": "word " * 2500}]
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model=CLOUD, messages=too_long_for_local, max_tokens=4, stream=stream)
        assert failed.value.status_code == 502
        assert failed.value.response.headers["x-should-retry"] == "false"
    assert [row["outcome"] for row in handle.rows()] == ["error", "error"]  # one turn per question
    assert len(proxy.chat_requests()) == 2  # the daemon's own attempt alone (cloud.max_retries 0)


def test_streams_nobody_reads_hold_neither_the_model_nor_the_door(daemon_factory: Any) -> None:
    """Clients that ask for a long stream and never read a byte of it, as many as the door has connections:
    each turn runs to its end without waiting for its reader (or is cancelled when its connection is cut
    off), the model is free for the next turn, the ZeroMQ socket answers meanwhile, and once the unread
    connections are cut off a bystander is served. Found fine; kept as a test."""
    handle, base = http_daemon(daemon_factory, max_connections=4, request_timeout_s=3.0)
    port = int(base.rsplit(":", 1)[1])
    long_chat = json.dumps(
        {
            "model": "auto",
            "stream": True,
            "max_tokens": 256,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        }
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(long_chat)
    )
    unread = []
    for _ in range(4):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", port))
        s.sendall(head + long_chat)
        unread.append(s)
    try:
        assert handle.client().ping()["pong"]
        wait_for(lambda: len(handle.rows()) == 4, 120, "the four turns to be accepted")
        wait_for(lambda: all(row["outcome"] != "pending" for row in handle.rows()), 300, "the four turns to end")
        assert {row["outcome"] for row in handle.rows()} <= {"ok", "cancelled"}
        assert handle.client().ask("Say hi.", max_tokens=2).done.outcome == "ok"  # the model is free

        def bystander_served() -> bool:
            try:
                return (
                    exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")[:12]
                    == b"HTTP/1.1 200"
                )
            except OSError:
                return False

        wait_for(bystander_served, 120, "a bystander to be served")
    finally:
        for s in unread:
            s.close()
    assert handle.proc.poll() is None and "Traceback" not in handle.log()


def test_pipelined_requests_read_a_little_at_a_time_cannot_keep_everyone_else_out(daemon_factory: Any) -> None:
    """Connections that pipeline ``GET /health`` (no key needed) and read their answers a little at a time,
    never quite stopping, held every slot of the door for good: a connection whose request has arrived was
    never taken for a newcomer, and one that reads now and then is never cut off as a client that reads
    nothing. Everyone else was answered 503 ``busy``. A connection that sends its next request before it has
    read the last answer (no browser or SDK does) now gives its slot to a newcomer, as an idle one does."""
    handle, base = http_daemon(daemon_factory, max_connections=2, request_timeout_s=600.0)
    port = int(base.rsplit(":", 1)[1])
    pipelines = [unread_health_checks(port) for _ in range(2)]
    try:
        wait_for(lambda: all(s.recv(4096) for s in pipelines), 60, "the pipelines to be answered")
        health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"

        def bystander_served() -> bool:
            try:
                return exchange(port, health).startswith(b"HTTP/1.1 200")
            except OSError:  # refused (503 and closed) before its request was read
                return False

        wait_for(bystander_served, 60, "a bystander to be served")
        assert "closed one pipelining requests, for a newcomer" in handle.log()  # its slot: the bystander's
    finally:
        for s in pipelines:
            s.close()
    assert handle.proc.poll() is None and "Traceback" not in handle.log()
