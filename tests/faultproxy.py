"""A fault-injecting HTTP proxy on loopback, in front of the real OpenAI-compatible test server.

It records every request it sees (path, headers, JSON body) and, per request, can delay it, answer with
an HTTP error (optionally with Retry-After), cut the streamed answer after a few chunks, or answer garbage;
or, without asking upstream, answer a hostile stream: one byte at a time (``trickle``), deltas without end
(``endless``), ``size`` different words (``many_words``), one event of ``size`` bytes (``huge_event``),
``size`` bytes without a newline (``no_newline``), a delta whose content is a list (``bad_delta``), a
short valid answer gzip-compressed (``gzip``), ``size`` bytes without a newline gzip-compressed to a few
hundred kB (``gzip_bomb``), gzip that inflates to nothing, an empty block per ``delay_s`` for 30 s
(``gzip_idle``), or a delta holding a lone UTF-16 surrogate (``surrogate``), a chunk whose ``choices`` is
a string (``bad_shape``), an event that is not UTF-8 (``not_utf8``) or a whole answer, its finish chunk
included, whose connection then drops before ``[DONE]`` and the body's end (``finished_then_dropped``);
redirect (``redirect``: ``status`` with ``location``); or relay the real answer with its ``usage``
replaced (``usage``) or its ``finish_reason`` replaced (``finish``), or once ``released`` is set
(``hold``: a turn kept in flight until the test lets it go). Hostile streams stop when the daemon hangs
up, or after ``size`` bytes / 10 minutes.
The upstream server runs a text-only model, so image parts are recorded, then replaced by a text marker
before forwarding.
"""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Fault:
    """What to do to the next ``times`` requests (None: every request)."""

    # pass | status | delay | cut | garbage | redirect | usage | finish, or one of HOSTILE_STREAMS
    kind: str = "pass"
    status: int = 500
    retry_after: str | None = None
    date: str | None = None  # a status fault's Date header (the server's clock); else this machine's now
    delay_s: float = 0.0
    cut_after_chunks: int = 3
    size: int = 1 << 20  # bytes of a huge_event or no_newline answer
    times: int | None = None
    location: str = ""  # where a redirect points
    usage: Any = None  # what a ``usage`` fault puts in the stream's usage chunk
    finish: str = "content_filter"  # what a ``finish`` fault puts in place of the stream's finish_reason
    message: str = "injected"  # the error message of a ``status`` fault's body
    released: threading.Event = field(default_factory=threading.Event)  # what a ``hold`` waits for (10 min at most)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def set(self, fault: Fault) -> None:
        with self.lock:
            self.faults = [fault]

    def next_fault(self) -> Fault:
        with self.lock:
            while self.faults:
                fault = self.faults[0]
                if fault.times is None:
                    return fault
                if fault.times > 0:
                    fault.times -= 1
                    return fault
                self.faults.pop(0)
            return Fault()

    def chat_requests(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.endswith("/chat/completions")]

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._forward(b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = {}
                with proxy.lock:
                    proxy.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, parsed))
                fault = proxy.next_fault()
                if fault.kind == "delay":
                    time.sleep(fault.delay_s)
                if fault.kind == "hold":
                    fault.released.wait(600)
                if fault.kind == "redirect":
                    self.send_response(fault.status)
                    self.send_header("Location", fault.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault.kind == "status":
                    payload = json.dumps({"error": {"message": fault.message, "type": "server_error"}}).encode()
                    self.send_response_only(fault.status)
                    self.send_header("Date", fault.date or self.date_time_string())
                    if fault.retry_after is not None:
                        self.send_header("Retry-After", fault.retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault.kind in HOSTILE_STREAMS:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    if fault.kind in GZIPPED:
                        self.send_header("Content-Encoding", "gzip")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for piece in HOSTILE_STREAMS[fault.kind](fault):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the daemon gave up on it: what the test wants
                    self.close_connection = True
                    return
                if fault.kind == "garbage":
                    payload = b"data: {this is not json\n\ndata: \x00\x01\x02\n\n"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._forward(json.dumps(_text_only(parsed)).encode(), fault)

            def _forward(self, body: bytes, fault: Fault | None = None) -> None:
                target = urlsplit(proxy.upstream)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                self.send_response(response.status)
                streaming = response.getheader("Content-Type", "").startswith("text/event-stream")
                for name in ("Content-Type",):
                    if response.getheader(name):
                        self.send_header(name, response.getheader(name, ""))
                if streaming:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        self._relay_stream(response, fault)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client (the daemon cancelling a turn) went away
                else:
                    data = response.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                conn.close()

            def _relay_stream(self, response: http.client.HTTPResponse, fault: Fault | None) -> None:
                chunks = 0
                usage_sent = False
                while line := response.readline():
                    if fault is not None and fault.kind == "usage" and line.startswith(b"data:"):
                        line, replaced = _with_usage(line, fault.usage)
                        if line.startswith(b"data: [DONE]") and not usage_sent:
                            extra = _usage_event(fault.usage)
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(extra), extra))
                        usage_sent = usage_sent or replaced
                    if fault is not None and fault.kind == "finish" and line.startswith(b"data:"):
                        line = _with_finish(line, fault.finish)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    if line.startswith(b"data:"):
                        chunks += 1
                        if fault is not None and fault.kind == "cut" and chunks >= fault.cut_after_chunks:
                            self.close_connection = True
                            self.connection.shutdown(2)  # the stream dies mid-answer, mid-body
                            return
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

        self.server = serve(Handler)
        return self

    def stop(self) -> None:
        if self.server is not None:
            shut(self.server)


def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server on a free loopback port, serving from a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def shut(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def _event(text: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "hostile",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "cloud-small",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _trickle(fault: Fault) -> Iterator[bytes]:
    """A valid answer, one byte per ``delay_s`` (never finishing within any sane deadline)."""
    deadline = time.monotonic() + 600
    for byte in _event("slow ") * 1000 + _event("", "stop") + b"data: [DONE]\n\n":
        if time.monotonic() > deadline:
            return
        yield bytes([byte])
        time.sleep(fault.delay_s or 0.2)


def _endless(fault: Fault) -> Iterator[bytes]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        yield _event("more ")


def _many_words(fault: Fault) -> Iterator[bytes]:
    """``size`` different words, in events of 2**15 words (about 250 kB, within the daemon's event bound)."""
    words = [f"w{i}" for i in range(fault.size)]
    for start in range(0, fault.size, 1 << 15):
        yield _event(" ".join(words[start : start + (1 << 15)]) + " ")
    yield _event("", "stop") + b"data: [DONE]\n\n"


def _huge_event(fault: Fault) -> Iterator[bytes]:
    yield _event("x" * fault.size)
    yield _event("", "stop") + b"data: [DONE]\n\n"


def _no_newline(fault: Fault) -> Iterator[bytes]:
    sent = 0
    block = b"data: " + b"y" * 65536
    while sent < fault.size:
        yield block
        sent += len(block)


def _bad_delta(fault: Fault) -> Iterator[bytes]:
    chunk = {"id": "hostile", "object": "chat.completion.chunk", "created": 0, "model": "cloud-small"}
    yield b"data: " + json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": ["a", "b"]}}]}).encode()
    yield b"\n\n" + _event("", "stop") + b"data: [DONE]\n\n"


def _bad_shape(fault: Fault) -> Iterator[bytes]:
    yield b'data: {"id": "hostile", "choices": "not a list"}\n\n' + _event("", "stop") + b"data: [DONE]\n\n"


def _not_utf8(fault: Fault) -> Iterator[bytes]:
    yield b'data: {"choices": [{"index": 0, "delta": {"content": "\xff\xfe"}}]}\n\n' + b"data: [DONE]\n\n"


def _surrogate(fault: Fault) -> Iterator[bytes]:
    yield _event("hi \ud800 there") + _event("", "stop") + b"data: [DONE]\n\n"  # JSON's escape "\ud800"


def _gzip(fault: Fault) -> Iterator[bytes]:
    yield gzip.compress(_event("Hello") + _event("", "stop") + b"data: [DONE]\n\n")


def _gzip_bomb(fault: Fault) -> Iterator[bytes]:
    pack = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    yield pack.compress(b"data: ") + pack.flush(zlib.Z_SYNC_FLUSH)  # at once: the daemon's read timeout runs
    block = b"z" * (1 << 20)
    for n in range(1, (fault.size >> 20) + 1):  # a flush every 16 MiB, never an empty chunk (it ends the body)
        packed = pack.compress(block) + (pack.flush(zlib.Z_SYNC_FLUSH) if n % 16 == 0 else b"")
        if packed:
            yield packed
    yield pack.flush()


EMPTY_BLOCK = b"\x00\x00\x00\xff\xff"  # deflate: a stored block, not the last, of no bytes


def _gzip_idle(fault: Fault) -> Iterator[bytes]:
    """Bytes on the wire, each piece in time for a per-read timeout, and no byte of answer: a gzip header,
    then an empty stored block (what a sync flush writes) per ``delay_s``, for 30 s."""
    pack = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    yield pack.compress(b"") + pack.flush(zlib.Z_SYNC_FLUSH)  # the stream is byte-aligned after it
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(fault.delay_s or 0.2)
        yield EMPTY_BLOCK
    yield pack.flush()


def _finished_then_dropped(fault: Fault) -> Iterator[bytes]:
    """A whole answer, its finish_reason ``finish``, then nothing: the handler closes the connection mid-body."""
    yield _event("The whole answer.")
    yield _event("", fault.finish)


def _with_usage(line: bytes, usage: Any) -> tuple[bytes, bool]:
    """An SSE data line with its non-null ``usage`` replaced, and whether there was one."""
    try:
        event = json.loads(line[5:])
    except ValueError:
        return line, False
    if not isinstance(event, dict) or event.get("usage") is None:
        return line, False
    return b"data: " + json.dumps({**event, "usage": usage}).encode() + b"\n", True


def _with_finish(line: bytes, finish: str) -> bytes:
    """An SSE data line with its non-null ``finish_reason`` replaced."""
    try:
        event = json.loads(line[5:])
    except ValueError:
        return line
    choices = event.get("choices") if isinstance(event, dict) else None
    if not choices or choices[0].get("finish_reason") is None:
        return line
    return b"data: " + json.dumps({**event, "choices": [{**choices[0], "finish_reason": finish}]}).encode() + b"\n"


def _usage_event(usage: Any) -> bytes:
    chunk = {"id": "usage", "object": "chat.completion.chunk", "created": 0, "model": "cloud-small", "choices": []}
    return b"data: " + json.dumps({**chunk, "usage": usage}).encode() + b"\n\n"


HOSTILE_STREAMS: dict[str, Callable[[Fault], Iterator[bytes]]] = {
    "bad_delta": _bad_delta,
    "trickle": _trickle,
    "endless": _endless,
    "many_words": _many_words,
    "huge_event": _huge_event,
    "no_newline": _no_newline,
    "gzip": _gzip,
    "surrogate": _surrogate,
    "bad_shape": _bad_shape,
    "not_utf8": _not_utf8,
    "gzip_bomb": _gzip_bomb,
    "gzip_idle": _gzip_idle,
    "finished_then_dropped": _finished_then_dropped,
}
GZIPPED = frozenset({"gzip", "gzip_bomb", "gzip_idle"})  # sent with Content-Encoding: gzip


def _text_only(body: dict[str, Any]) -> dict[str, Any]:
    """Replace image parts by a marker: the upstream test model reads text only."""
    messages = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") if p.get("type") == "text" else "[image]" for p in content]
            message = {**message, "content": "\n".join(texts)}
        messages.append(message)
    return {**body, "messages": messages} if "messages" in body else body


def image_parts(seen: Seen) -> list[str]:
    """The data URLs of the image parts in a recorded chat request."""
    urls = []
    for message in seen.body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            urls.extend(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
    return urls
