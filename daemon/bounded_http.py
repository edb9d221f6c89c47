"""An HTTP transport that bounds what a cloud endpoint can make the daemon hold or wait for.

httpx2's timeouts are per read: an endpoint that sends one byte a second never times out, and nothing
stops an endless stream, a 50 MB event or 512 MB without a newline. The cloud client's transport wraps
every response body so that, for the cloud call running on this thread (``limits``), reading it stops with
``OverBound`` once the turn's deadline has passed, once the body passes ``max_bytes``, or once one line
(an SSE event's line) passes ``max_line_bytes``. The time before the first byte is bounded by the read
timeout, cut to what is left of the deadline.

The bytes counted are the answer's, not the wire's: a gzip or deflate body is inflated here, a piece of at
most INFLATE_PIECE bytes at a time, and the bounds apply to what it inflates to (httpx2 would inflate it
above the transport, unbounded: 300 kB of gzip made a 300 MB event); the deadline is still checked at each
chunk off the wire, as gzip that inflates to nothing brings no answer bytes to check it at. Any other
Content-Encoding is refused, and requests ask for those two only.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx2

# Content-Encodings inflated here, by zlib's window bits; requests name these alone in Accept-Encoding.
INFLATED = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
ACCEPT_ENCODING = "gzip, deflate"
INFLATE_PIECE = 64 << 10  # the most one zlib call may inflate, before the bounds are checked again


class OverBound(Exception):
    """A response went past one of its turn's bounds; ``code`` is the CloudError code to report."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    deadline: float  # time.monotonic() by which the turn's cloud call must be over
    max_bytes: int
    max_line_bytes: int

    def left(self) -> float:
        return self.deadline - time.monotonic()


_current = threading.local()


@contextmanager
def limits(bounds: Limits) -> Iterator[None]:
    """Apply ``bounds`` to every response read on this thread meanwhile (the cloud call's, ``walkaway.py``)."""
    _current.limits = bounds
    try:
        yield
    finally:
        _current.limits = None


class HandshakeFailed(httpx2.ConnectError):
    """A connection was made (to the endpoint, or to its proxy), but its TLS handshake failed: the network is
    there, and something on it (a captive portal, a middlebox, a wrong certificate) refuses the endpoint."""


class HandshakeTimeout(httpx2.ConnectTimeout):
    """A connection was made, but its TLS handshake did not end within the connect timeout (``HandshakeFailed``)."""


class ProxyRefused(httpx2.ConnectError):
    """The proxy the request goes through answered its CONNECT with an error status (403: the endpoint's host
    is not allowed through it; 502: it could not reach it): the proxy is there, the endpoint was not reached
    and was sent nothing. ``status`` is the proxy's status line (``403 Forbidden``)."""

    def __init__(self, status: str, request: httpx2.Request) -> None:
        super().__init__(status, request=request)
        self.status = status


AFTER_CONNECTING = (HandshakeFailed, HandshakeTimeout, ProxyRefused)


class BoundedTransport(httpx2.HTTPTransport):
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        """The response, bounded; a failure to connect after the TCP connection was made is raised as
        ``HandshakeFailed`` or ``HandshakeTimeout``, and a proxy's refused CONNECT as ``ProxyRefused``: the
        network probe, which only connects, vouches for none."""
        steps: list[str] = []
        traced = request.extensions.get("trace")

        def trace(name: str, info: dict[str, object]) -> None:
            steps.append(name)
            if traced is not None:
                traced(name, info)

        request.extensions["trace"] = trace
        try:
            return self._bounded(request)
        except httpx2.ConnectTimeout as exc:
            if "connection.connect_tcp.complete" not in steps:
                raise
            raise HandshakeTimeout(str(exc), request=request) from exc
        except httpx2.ConnectError as exc:
            if "connection.connect_tcp.complete" not in steps:
                raise
            raise HandshakeFailed(str(exc), request=request) from exc
        except httpx2.ProxyError as exc:  # its status line, the proxy's own text: printable, and not a page of it
            status = "".join(c if c.isprintable() else "?" for c in str(exc))[:100]
            raise ProxyRefused(status, request=request) from exc

    def _bounded(self, request: httpx2.Request) -> httpx2.Response:
        bounds: Limits | None = getattr(_current, "limits", None)
        if bounds is None:
            return super().handle_request(request)
        left = bounds.left()
        if left <= 0:
            raise OverBound("the turn's cloud deadline passed before the request", "cloud_deadline")
        timeout = dict(request.extensions.get("timeout", {}))
        for key in ("connect", "read", "write", "pool"):
            timeout[key] = left if timeout.get(key) is None else min(timeout[key], left)
        request.extensions["timeout"] = timeout
        request.headers["Accept-Encoding"] = ACCEPT_ENCODING
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        response.stream = _BoundedStream(_decoded(response), bounds)
        return response


def _decoded(response: httpx2.Response) -> httpx2.SyncByteStream:
    """The response's body as the answer's bytes: inflated here if compressed, and the Content-Encoding
    header removed, so that the client above reads it as it is."""
    codings = [c for c in response.headers.get_list("content-encoding", split_commas=True) if c.strip()]
    named = [c.strip().lower() for c in codings if c.strip().lower() != "identity"]
    assert isinstance(response.stream, httpx2.SyncByteStream)
    if not named:
        return response.stream
    if len(named) > 1 or named[0] not in INFLATED:
        response.stream.close()
        shown = ", ".join(named)[:100].encode("ascii", "backslashreplace").decode()
        why = f"the answer came in Content-Encoding {shown}, which locod does not read"
        raise OverBound(why, "cloud_invalid_reply")
    del response.headers["content-encoding"]
    return _Inflated(response.stream, INFLATED[named[0]])


class _Inflated(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, wbits: int) -> None:
        self.inner, self.wbits = inner, wbits

    def __iter__(self) -> Iterator[bytes]:
        inflate = zlib.decompressobj(self.wbits)
        first = self.wbits == zlib.MAX_WBITS  # "deflate" comes with zlib's header or, from some, without
        try:
            for chunk in self.inner:
                try:
                    piece = inflate.decompress(chunk, INFLATE_PIECE)
                except zlib.error:
                    if not first:
                        raise
                    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                    piece = inflate.decompress(chunk, INFLATE_PIECE)
                first = False
                yield piece  # b"" too: the bounds above check the deadline once per chunk off the wire
                while piece:
                    piece = inflate.decompress(inflate.unconsumed_tail, INFLATE_PIECE)
                    if piece:
                        yield piece
            if tail := inflate.flush():
                yield tail
        except zlib.error as exc:
            raise OverBound(f"the answer's compressed data is damaged ({exc})", "cloud_invalid_reply") from None

    def close(self) -> None:
        self.inner.close()


class _BoundedStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, bounds: Limits) -> None:
        self.inner, self.bounds = inner, bounds

    def __iter__(self) -> Iterator[bytes]:
        total = line = 0  # bytes so far, and bytes since the last newline
        for chunk in self.inner:
            total += len(chunk)
            first = chunk.find(b"\n")
            if first < 0:
                line += len(chunk)
                longest = line
            else:
                longest = max(line + first, _longest_line(chunk) if len(chunk) > self.bounds.max_line_bytes else 0)
                line = len(chunk) - chunk.rfind(b"\n") - 1
            if total > self.bounds.max_bytes:
                raise OverBound(f"the answer passed {self.bounds.max_bytes} bytes", "cloud_answer_too_large")
            if longest > self.bounds.max_line_bytes:
                raise OverBound(f"one event passed {self.bounds.max_line_bytes} bytes", "cloud_answer_too_large")
            if self.bounds.left() <= 0:
                raise OverBound("the answer was still streaming at the turn's cloud deadline", "cloud_deadline")
            if chunk:  # an inflated body's empty piece is passed here for the deadline alone
                yield chunk

    def close(self) -> None:
        self.inner.close()


def _longest_line(chunk: bytes) -> int:
    return max(len(part) for part in chunk.split(b"\n"))
