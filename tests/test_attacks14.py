"""Attack round 14: many clients at once, clients that leave at bad moments, and stops while they talk
(docs/reliability.md, "Concurrency, cancellation and stops"). Real daemon, real model, real sockets."""

from __future__ import annotations

import functools
import json
import signal
import socket
import threading
from collections import Counter
from typing import Any

import zmq

from .conftest import DaemonHandle, free_port, wait_for

SAY_HI = {"model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}


def dealer(handle: DaemonHandle, ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)  # closed at once: what a client that goes away does
    sock.connect(handle.endpoint)
    return sock


def send(sock: zmq.Socket[bytes], request_id: str, op: str, **fields: Any) -> None:
    sock.send(json.dumps({"v": 1, "id": request_id, "op": op, **fields}).encode())


def receive(sock: zmq.Socket[bytes]) -> dict[str, Any]:
    assert sock.poll(300_000), "nothing from the daemon for 300 s"
    frame: dict[str, Any] = json.loads(sock.recv())
    return frame


def status(handle: DaemonHandle, ctx: zmq.Context[zmq.Socket[bytes]]) -> dict[str, Any]:
    sock = dealer(handle, ctx)
    try:
        send(sock, "status", "status")
        data: dict[str, Any] = receive(sock)["data"]
        return data
    finally:
        sock.close()


def test_a_client_gone_while_its_turn_waits_for_the_model_is_neither_recorded_nor_run(daemon: DaemonHandle) -> None:
    """A socket client that sent a turn and closed while the turn waited for the local model behind another
    was not noticed until the turn's own `decision` frame failed: the turn was recorded as accepted, its
    whole prompt read by the model (seconds for a long one, every other client waiting), then `cancelled`.
    Thirty-two such turns per connection were thirty-two records and prompt reads for nobody (a turn asking
    for `queued` frames was found out by the next one, up to 30 s later). An HTTP client's hang-up was seen
    while it waited. Now the loop looks at the connections of waiting turns every
    second: the turn leaves the queue, refused like one that was never accepted, and writes nothing."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    holder = dealer(daemon, ctx)
    send(holder, "holder", "chat", prompt="Write a very long story about a dragon.", options={"max_tokens": 1500})
    while receive(holder)["type"] != "delta":  # it holds the model
        pass
    leaver = dealer(daemon, ctx)
    send(leaver, "leaver", "chat", prompt="Say hi.")  # without `queued`, whose frames every 30 s would find it gone
    wait_for(lambda: status(daemon, ctx)["queue"]["waiting_for_local"] == 1, 60, "the turn to queue")
    leaver.close()
    wait_for(lambda: status(daemon, ctx)["queue"]["waiting_for_local"] == 0, 60, "the queued turn to leave")
    holder.close()
    wait_for(lambda: status(daemon, ctx)["queue"]["in_flight"] == 0, 120, "the holder's turn to end")
    assert [r["request_id"] for r in daemon.rows()] == ["holder"]  # cancelled, or done if it ended first
    ctx.destroy(linger=0)


def test_http_requests_that_arrive_as_the_daemon_stops_are_answered(daemon_factory: Any) -> None:
    """A chat completion handed to the serving loop after its last pass (SIGTERM, the turns in flight just
    finished) was never admitted nor refused: its connection hung until the HTTP server's 10 s join gave up,
    then the process ended and the client saw the connection closed with no status (6 of about 600 requests
    of this flood), and the stop took 10 s longer. A turn handed in once the loop stops admitting is now
    refused 503 `shutting_down` at once, as during the grace."""
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}, "local": {"n_threads": 1}})
    body = json.dumps(SAY_HI).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    seen: Counter[str] = Counter()
    lock, answered_once, stop = threading.Lock(), threading.Event(), threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=120)
            except OSError:
                outcome = "refused"  # the port is closed: the daemon is gone, or going
            else:
                with conn:
                    try:
                        conn.sendall(head.encode() + body)
                        reply = b"".join(iter(functools.partial(conn.recv, 65536), b""))
                        outcome = reply.split(b"\r\n", 1)[0].decode() or "closed without a status"
                    except ConnectionResetError:
                        outcome = "reset"  # still in the listen backlog when the port closed: never read
            with lock:
                seen[outcome] += 1
            if outcome.startswith("HTTP/1.1 200"):
                answered_once.set()

    threads = [threading.Thread(target=flood) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        assert answered_once.wait(120), "no answer from the HTTP door"
        wait_for(lambda: sum(seen.values()) >= 50, 120, "the flood to be under way")
        handle.proc.send_signal(signal.SIGTERM)
        assert handle.proc.wait(120) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert seen["closed without a status"] == 0, seen
    assert set(seen) <= {"HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable", "refused", "reset"}, seen
    assert "stopped after" in handle.log()
