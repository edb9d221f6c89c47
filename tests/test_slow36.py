"""Slow and absent clients against a running daemon: HTTP clients that stop reading what they are sent,
and what they can hold of the door meanwhile. Real daemon, real sockets (docs/http.md, What a client can hold)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from typing import Any

import zmq
from zmq import Context

from .conftest import DaemonHandle, wait_for
from .test_attacks14 import dealer, receive, send, status
from .test_http_door import http_daemon, request

PIPELINED = 120_000  # GET /health requests sent at once: their answers, unread, fill every buffer on the way


def unread_health_checks(port: int) -> socket.socket:
    """A connection that sends many pipelined requests (``GET /health`` needs no key) and reads none of the
    answers, with a receive buffer as small as the kernel allows; its requests go on a thread of their own,
    since the sending stalls too once the daemon stops reading them."""
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.connect(("127.0.0.1", port))
    requests = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * PIPELINED

    def send() -> None:
        with contextlib.suppress(OSError):  # cut off: reset under the sending
            stalled.sendall(requests)

    threading.Thread(target=send, daemon=True).start()
    return stalled


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status_file:
        kib = next(int(line.split()[1]) for line in status_file if line.startswith("VmRSS:"))
    return kib / 1024


def until_queue(handle: DaemonHandle, ctx: Context) -> Callable[[str, int], None]:
    """Wait until one of `locod status`'s queue counts reads a value."""

    def reads(count: str, value: int) -> None:
        wait_for(lambda: status(handle, ctx)["queue"][count] == value, 120, f"{count} to be {value}")

    return reads


def cut_off(s: socket.socket) -> bool:
    """Whether the daemon has closed this connection: reading what it did send ends in EOF or a reset."""
    s.settimeout(0.5)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_a_client_that_stops_reading_its_answers_loses_its_connection(daemon_factory: Any) -> None:
    """A connection whose answers wait unread, in the kernel's buffers and then the transport's, had uvicorn's
    send wait for it for good: its response never ended, and a connection whose request has arrived is never
    evicted, so such clients (without the key: ``/health`` is open) held the door's every slot and everyone
    else was answered 503 ``busy`` for as long as they liked. One that reads nothing for
    ``http.request_timeout_s`` is now cut off, and its slot goes to the next client."""
    handle, port = http_daemon(daemon_factory, {"http": {"max_connections": 1, "request_timeout_s": 2.0}})
    rss_before = resident_mib(handle.proc.pid)
    stalled = unread_health_checks(port)
    try:
        # no newcomer meanwhile: one would take a pipelining connection's slot at once (test_httpattack43)
        wait_for(lambda: "read nothing of its answer" in handle.log(), 120, "the client to be cut off")

        def bystander_answered() -> bool:
            try:
                return request(port, "GET", "/health")[0] == 200
            except OSError:  # refused (503 and closed) while the slot is held
                return False

        wait_for(bystander_answered, 120, "a bystander to be answered")
        assert cut_off(stalled)
        assert handle.client().ping()["pong"]
        assert resident_mib(handle.proc.pid) - rss_before < 64  # what waited for it: the transport's 64 KiB
    finally:
        stalled.close()
    log = handle.log()
    assert handle.proc.poll() is None and "Traceback" not in log
    assert log.count("read nothing of its answer") == 1


def test_an_http_client_gone_while_its_turn_waits_for_the_model_is_neither_recorded_nor_run(
    daemon_factory: Any, ctx: Context
) -> None:
    """The HTTP side of test_attacks14's socket case: a chat completion whose client hangs up while it waits
    for the local model behind another turn leaves the queue unrecorded, and the model never reads it."""
    handle, port = http_daemon(daemon_factory)
    holder = dealer(handle, ctx)
    send(holder, "holder", "chat", prompt="Write a very long story about a dragon.", options={"max_tokens": 1500})
    while receive(holder)["type"] != "delta":  # it holds the model
        pass
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "Say hi."}]}).encode()
    leaver = socket.create_connection(("127.0.0.1", port))
    leaver.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    queued = until_queue(handle, ctx)
    queued("waiting_for_local", 1)
    leaver.close()
    queued("waiting_for_local", 0)  # gone, without waiting for the holder
    holder.close()
    queued("in_flight", 0)
    assert [r["request_id"] for r in handle.rows()] == ["holder"]  # cancelled, or done if it ended first


def test_socket_clients_that_never_read_hold_neither_the_model_nor_a_bystander(
    daemon: DaemonHandle, ctx: Context
) -> None:
    """Chats whose clients never read a frame (ZeroMQ's receive queue at one message, the kernel's buffer
    at its least): each turn runs to its end or is cancelled when the heartbeat drops its client (docs/
    reliability.md), none keeps the model, a bystander is answered meanwhile, and what waited for them is
    bounded (``daemon.max_queued_bytes`` each)."""
    rss_before = resident_mib(daemon.proc.pid)
    silent = []
    for n in range(4):
        sock = dealer(daemon, ctx)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 1024)
        send(sock, f"silent-{n}", "chat", prompt="Write a long story about a dragon.", options={"max_tokens": 300})
        silent.append(sock)
    try:
        assert daemon.client().ask("Say hi.", max_tokens=4).done.outcome == "ok"
        until_queue(daemon, ctx)("in_flight", 0)
        outcomes = {r["request_id"]: r["outcome"] for r in daemon.rows()}
        assert {outcomes[f"silent-{n}"] for n in range(4)} <= {"ok", "cancelled"}, outcomes
        assert resident_mib(daemon.proc.pid) - rss_before < 64
    finally:
        for sock in silent:
            sock.close()


def queues_of(port: int) -> list[tuple[int, int]]:
    """The send and receive queues, in bytes, of the daemon's end of each connection to ``port``."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return [
        (int(row[4].split(":")[0], 16), int(row[4].split(":")[1], 16))
        for row in rows
        if int(row[1].split(":")[1], 16) == port and row[3] == "01"
    ]


def test_a_stop_does_not_wait_for_a_client_that_reads_nothing(daemon_factory: Any) -> None:
    """At a stop uvicorn waits for every connection to end, and one whose answer waits unread never did: the
    stop waited until the daemon gave up on the HTTP thread (10 s). Such a connection is cut off at once."""
    handle, port = http_daemon(daemon_factory, {"http": {"request_timeout_s": 600.0}})
    stalled = unread_health_checks(port)
    try:
        seen: list[list[tuple[int, int]]] = []

        def stuck() -> bool:  # nothing moves on the connection for 3 s and more: the send waits for the client
            seen.append(queues_of(port))  # (a daemon starved of CPU on a loaded machine pauses for a second)
            return len(seen) > 60 and all(queues == seen[-1] for queues in seen[-60:]) and seen[-1][0][0] > 0

        wait_for(stuck, 120, "the daemon's answers to wait unread")
        handle.proc.terminate()
        assert handle.proc.wait(60) == 0
        assert "read nothing of its answer at the stop: cut off" in handle.log()
    finally:
        stalled.close()
