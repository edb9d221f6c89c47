"""An HTTP transport that bounds what a cloud endpoint can make the daemon hold or wait for.

httpx2's timeouts are per read: an endpoint that sends one byte a second never times out, and nothing
stops an endless stream, a 50 MB event or 512 MB without a newline. The cloud client's transport wraps
every response body so that, for the turn running on this thread (``limits``), reading it stops with
``OverBound`` once the turn's deadline has passed, once the body passes ``max_bytes``, or once one line
(an SSE event's line) passes ``max_line_bytes``. The time before the first byte is bounded by the read
timeout, cut to what is left of the deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx2


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
    """Apply ``bounds`` to every response read on this thread meanwhile (the turn's own thread)."""
    _current.limits = bounds
    try:
        yield
    finally:
        _current.limits = None


class BoundedTransport(httpx2.HTTPTransport):
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
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
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        response.stream = _BoundedStream(response.stream, bounds)
        return response


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
            yield chunk

    def close(self) -> None:
        self.inner.close()


def _longest_line(chunk: bytes) -> int:
    return max(len(part) for part in chunk.split(b"\n"))
