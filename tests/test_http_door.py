"""What the HTTP door lets in: bounded connections and request times (so no client without the key can
take the daemon's descriptors, and with them its ZeroMQ socket), no requests a web page could make, and
one budget of turns per connection. Real daemon, real sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from locod.errors import Busy
from locod.protocol import ChatOptions, ChatRequest

from .conftest import DaemonHandle, free_port, wait_for

LOCAL = "smollm2-135m-instruct"
PARTIAL = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # never the blank line


def http_daemon(factory: Any, config: dict[str, Any] | None = None, **kwargs: Any) -> tuple[DaemonHandle, int]:
    port = free_port()
    config = dict(config or {})
    config["http"] = {"listen": f"127.0.0.1:{port}", **config.get("http", {})}
    return factory(config, **kwargs), port


def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """One raw HTTP request on its own connection: (status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def daemon_fds(handle: DaemonHandle) -> int:
    return len(os.listdir(f"/proc/{handle.proc.pid}/fd"))


def test_half_finished_connections_cannot_take_the_daemons_descriptors(daemon_factory: Any) -> None:
    """The attack of F1: many connections that never finish their headers. With an open-file limit of 300
    the door holds at most 150 (http.max_connections is clamped to half), answers the rest 503, closes the
    slow ones after http.request_timeout_s, and the ZeroMQ socket keeps answering: no libzmq abort, no
    flood of tracebacks in the log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle, port = http_daemon(
        daemon_factory, {"http": {"max_connections": 5000, "request_timeout_s": 5.0}}, fd_limit=300
    )
    assert "http.max_connections is 5000, over 50% of the open-file limit (300): using 150" in handle.log()
    held = []
    try:
        for _ in range(400):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(PARTIAL)
            held.append(s)
        assert handle.proc.poll() is None
        assert daemon_fds(handle) < 300
        # a fresh ZeroMQ client (a new ipc connection: what libzmq aborted on) and a whole turn
        assert handle.client().ping()["pong"]
        assert handle.client().ask("Say hi.", max_tokens=2).done.outcome == "ok"
        # the ones over the limit were closed at once (answered 503, which a reset may overtake: the
        # daemon closes them with their request unread)
        for s in held[-50:]:
            try:
                refused = s.recv(4096)
            except ConnectionResetError:
                continue
            assert refused == b"" or refused.startswith(b"HTTP/1.1 503 Service Unavailable")
        # a slow one, still sending header lines, is closed after http.request_timeout_s
        trickler = held[0]

        def closed() -> bool:
            try:
                trickler.sendall(b"x-more: 1\r\n")
                trickler.settimeout(0.5)
                return trickler.recv(1) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        wait_for(closed, 60, "the slow connection to be closed")
        wait_for(lambda: request(port, "GET", "/health")[0] == 200, 60, "the door to serve again")
    finally:
        for s in held:
            s.close()
    log = handle.log()
    assert handle.proc.poll() is None and "Traceback" not in log
    assert log.count("refusing more") <= 2 and log.count("within http.request_timeout_s") <= 2


def test_requests_sent_a_byte_at_a_time_cannot_keep_everyone_else_out(daemon_factory: Any) -> None:
    """A client without the key holds every connection with requests it never finishes. Refusing the
    newcomer kept the owner out for as long as the squatter liked; now the newcomer takes the slot of the
    request that has been arriving longest, and is answered."""
    handle, port = http_daemon(daemon_factory, {"http": {"max_connections": 4, "request_timeout_s": 600.0}})
    squatters = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
    try:
        for s in squatters:
            s.sendall(PARTIAL)
        chat = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
        headers = {"Content-Type": "application/json"}

        def answered() -> bool:
            try:
                return request(port, "POST", "/v1/chat/completions", chat, headers)[0] == 200
            except OSError:  # refused (503 and closed) while it was still sending
                return False

        wait_for(answered, 60, "the newcomer to be answered")
        assert "closed one still sending its request" in handle.log()

        def closed(s: socket.socket) -> bool:
            s.settimeout(1)
            with contextlib.suppress(TimeoutError):
                return s.recv(1) == b""
            return False

        assert sum(closed(s) for s in squatters) >= 1  # the evicted squatters were closed
    finally:
        for s in squatters:
            s.close()


def test_requests_a_web_page_could_send_are_refused(daemon_factory: Any) -> None:
    """F23: a text/plain or form body (sent by a browser without a preflight), a foreign Host (DNS
    rebinding) or a foreign Origin: refused before any turn, with an error body that says why."""
    handle, port = http_daemon(daemon_factory)
    chat = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data", None):
        status, body = request(port, "POST", "/v1/chat/completions", chat, {"Content-Type": kind} if kind else {})
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type"), kind
        assert "application/json" in body["error"]["message"]
    json_type = {"Content-Type": "application/json"}
    for host in ("rebind.attacker.example:80", "evil.example", "127.0.0.1.evil.example"):
        for method, path, body in (("POST", "/v1/chat/completions", chat), ("GET", "/metrics", None)):
            status, answer = request(port, method, path, body, {**json_type, "Host": host})
            assert (status, answer["error"]["code"]) == (403, "host_not_allowed"), (host, path)
            assert "not this machine" in answer["error"]["message"]
    status, answer = request(
        port, "POST", "/v1/chat/completions", chat, {**json_type, "Origin": "http://rebind.attacker.example"}
    )
    assert (status, answer["error"]["code"]) == (403, "origin_not_allowed")
    assert handle.rows() == []
    # what the SDKs and local tools send is served, whichever name of this machine they use
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert request(port, "GET", "/v1/models", headers={"Host": host})[0] == 200
    status, answer = request(
        port, "POST", "/v1/chat/completions", chat, {"Content-Type": "application/json; charset=utf-8"}
    )
    assert status == 200 and answer["choices"][0]["message"]["content"] is not None
    assert len(handle.rows()) == 1


def test_a_page_named_in_cors_origins_may_call_the_api_from_the_browser(daemon_factory: Any) -> None:
    """A chat UI that calls the API from the browser: its preflight is granted and its answers are readable
    by it, only for the origins http.cors_origins names; any other page is refused as before."""
    ui = "http://chat.example:3000"
    handle, port = http_daemon(daemon_factory, {"http": {"cors_origins": [ui]}})
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, x-stainless-os",
    }

    def raw(method: str, path: str, origin: str, body: Any = None, **headers: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Origin": origin, "Content-Type": "application/json", **headers})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response

    granted = raw("OPTIONS", "/v1/chat/completions", ui, **preflight)
    assert granted.status == 204 and granted.getheader("access-control-allow-origin") == ui
    assert granted.getheader("access-control-allow-headers") == "authorization, x-stainless-os"
    chat = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    answered = raw("POST", "/v1/chat/completions", ui, chat)
    assert answered.status == 200 and answered.getheader("access-control-allow-origin") == ui
    assert "x-locod-location" in (answered.getheader("access-control-expose-headers") or "")

    other = "http://other.example:3000"
    assert raw("OPTIONS", "/v1/chat/completions", other, **preflight).status == 405
    refused = raw("POST", "/v1/chat/completions", other, chat)
    assert refused.status == 403 and refused.getheader("access-control-allow-origin") is None
    assert len(handle.rows()) == 1


def test_each_http_connection_has_its_own_turn_budget(daemon_factory: Any) -> None:
    """F11: one HTTP client's turns in flight do not count against another's from the same host; the
    socket's refusal names the setting that sets the budget."""
    handle, port = http_daemon(daemon_factory, {"daemon": {"max_turns_per_client": 1}})
    long = {"model": LOCAL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 300}
    hog = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    other = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Content-Type": "application/json"}
        hog.request("POST", "/v1/chat/completions", json.dumps({**long, "stream": True}), headers)
        first = hog.getresponse()
        assert first.status == 200 and first.fp is not None and first.fp.readline()  # generating
        other.request("POST", "/v1/chat/completions", json.dumps({**long, "max_tokens": 2, "stream": True}), headers)
        assert other.getresponse().status == 200  # not 429: it is another client
    finally:
        hog.close()
        other.close()
    with handle.client() as client:
        rid = client.send(
            ChatRequest(
                "a",
                [{"role": "user", "content": "Tell a long story."}],
                None,
                LOCAL,
                options=ChatOptions(max_tokens=300),
            )
        )
        next(client.frames(rid, 60_000))
        with pytest.raises(Busy, match=r"daemon\.max_turns_per_client"):
            client.ask("Hi", max_tokens=2)


SERVER_OUT_OF_FDS = """
import asyncio, logging, resource, sys
from locod.daemon.httpconn import loop_errors
from locod.daemon.logs import Throttle
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
held = []

class Hold(asyncio.Protocol):
    def connection_made(self, transport):
        held.append(transport)

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_errors(Throttle(logging.getLogger('locod.daemon.httpconn'), 60)))
    server = await loop.create_server(Hold, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(float(sys.argv[1]))

asyncio.run(main())
"""


def test_running_out_of_descriptors_is_logged_once_not_per_retry(tmp_path: Path) -> None:
    """F2: asyncio logs a traceback for every failed accept, thousands a second; the HTTP thread's loop
    says it once per interval. A real event loop whose process has 48 descriptors, 200 clients."""
    script = tmp_path / "server.py"
    script.write_text(SERVER_OUT_OF_FDS)
    proc = subprocess.Popen(
        [sys.executable, str(script), "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    clients = []
    for _ in range(200):
        with contextlib.suppress(OSError):  # once its backlog is full too, the kernel refuses
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    assert len(clients) > 48
    _, err = proc.communicate(timeout=60)
    for client in clients:
        client.close()
    assert proc.returncode == 0, err
    assert err.count("cannot accept connections: Too many open files") == 1, err[:2000]
    assert "Traceback" not in err and "out of system resource" not in err
