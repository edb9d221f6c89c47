"""A loopback file server for the pull tests: HTTP Range, an injected cut mid-file, and a hub's redirects.

``/files/NAME`` serves a file (GET and HEAD, ``Range: bytes=N-`` answered 206). ``/OWNER/REPO/resolve/main/
NAME`` answers like the Hugging Face hub: a 302 to ``/files/NAME`` whose ``X-Linked-Etag`` is the file's
SHA-256 (or whatever ``published`` says). Each served file can be cut once after some bytes (the headers
still promise the whole length), sent without a Content-Length, claim a larger size than it has, or go on
with zeros after its data until the client hangs up (``endless``, without a Content-Length).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .faultproxy import serve, shut


@dataclass
class Served:
    data: bytes
    cut_after: int | None = None  # the next GET stops after this many body bytes, then the cut is spent
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    claimed_size: int | None = None  # the Content-Length to announce instead of the real one
    published: str | None = None  # the hub's X-Linked-Etag; None: the real SHA-256
    endless: bool = False  # after ``data``, zeros until the client hangs up (or 1 GiB), no Content-Length


@dataclass
class Seen:
    method: str
    path: str
    range: str | None


@dataclass
class FileServer:
    files: dict[str, Served] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FileServer:
        owner = self

        class Handler(_Handler):
            fs = owner

        self.server = serve(Handler)
        return self

    def stop(self) -> None:
        if self.server is not None:
            shut(self.server)

    def gets(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "GET"]


class _Handler(BaseHTTPRequestHandler):
    fs: FileServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        with self.fs.lock:
            self.fs.seen.append(Seen(self.command, self.path, self.headers.get("Range")))
        parts = self.path.strip("/").split("/")
        if len(parts) == 5 and parts[2:4] == ["resolve", "main"] and parts[4] in self.fs.files:
            served = self.fs.files[parts[4]]
            self.send_response(302)
            self.send_header("Location", f"/files/{parts[4]}")
            self.send_header("X-Linked-Etag", f'"{served.published or hashlib.sha256(served.data).hexdigest()}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if len(parts) != 2 or parts[0] != "files" or parts[1] not in self.fs.files:
            self.send_error(404)
            return
        self._send_file(self.fs.files[parts[1]], body)

    def _send_file(self, served: Served, body: bool) -> None:
        start = int(self.headers["Range"][6:].rstrip("-")) if self.headers.get("Range") else 0
        size = served.claimed_size or len(served.data)
        if start >= size:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        if not (served.no_length or served.endless):
            self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        data = served.data[start:]
        with self.fs.lock:
            if served.cut_after is not None:
                data, served.cut_after = data[: served.cut_after], None
        try:
            self.wfile.write(data)
            for _ in range(1024 if served.endless else 0):
                self.wfile.write(b"\0" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


def gguf_bytes(size: int, context_length: int = 8192, file_type: int = 15) -> bytes:
    """A GGUF header (llama architecture, with a string array to skip) padded with zeros to ``size`` bytes."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(8, "little") + raw

    def kv(key: str, kind: int, value: bytes) -> bytes:
        return string(key) + kind.to_bytes(4, "little") + value

    tokens = (8).to_bytes(4, "little") + (2).to_bytes(8, "little") + string("<s>") + string("hello")
    kvs = [
        kv("general.architecture", 8, string("llama")),
        kv("tokenizer.ggml.tokens", 9, tokens),
        kv("llama.context_length", 4, context_length.to_bytes(4, "little")),
        kv("general.file_type", 4, file_type.to_bytes(4, "little")),
    ]
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + len(kvs).to_bytes(8, "little")
    data = header + b"".join(kvs)
    return data + b"\0" * (size - len(data))
