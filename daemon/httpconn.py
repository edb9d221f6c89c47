"""What one HTTP client can hold of the daemon before it has sent a whole request (docs/http.md).

A connection costs a file descriptor from the moment it is accepted, and the bearer key is only read once
its request is complete, so a client without the key could hold every descriptor of the process: the
HTTP port then dies, and libzmq aborts the whole daemon on the next ipc connection it cannot accept. Here
the HTTP door is bounded: at most ``http.max_connections`` at once (more are answered 503 and closed at
once), each request must arrive, headers and body, within ``http.request_timeout_s``, and the event
loop's errors (``accept`` out of descriptors) are logged once per interval, not once per retry.

A client that stops reading its answer would otherwise keep its connection for good: once the kernel's
buffer and the transport's are full, uvicorn's send waits for it, the response never ends, and a connection
whose request has arrived is never evicted. So one that reads nothing for ``http.request_timeout_s`` while
its answer waits is cut off.

Refusing newcomers alone would let anyone who can reach the port keep every slot with requests sent a
byte at a time, opening a new one as each times out. So a newcomer that finds the door full takes the
slot of the connection that has been sending its request longest, once that has had ``EVICT_AFTER_S``;
else that of the connection idle longest between requests: a kept-alive connection holds nothing, and a
cheap request every few seconds (``GET /health`` needs no key, a 401 keeps the connection too) kept one
open for good; else that of a connection pipelining (sending its next request before the answer to the last
was whole: no browser or SDK does) whose answers wait unread: read a little at a time, never quite
stopping, they kept it open for good. Any other connection whose request has arrived (its turn running,
its answer streaming) is never evicted.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from locod.daemon.logs import Throttle
from locod.daemon.openai_wire import HttpError, request_id

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
EVICT_AFTER_S = 5.0  # a request still arriving after this may lose its connection to a newcomer
EVICTED_FOR = {
    "arriving": f"still sending its request after {EVICT_AFTER_S:.0f} s",
    "idle": "idle between requests",
    "pipelining": "pipelining requests",
}


@dataclass
class Limits:
    """The HTTP door's bounds, and the connections it holds now (touched by the event loop's thread only)."""

    max_connections: int
    request_timeout_s: float
    open: int = 0
    throttle: Throttle = field(default_factory=lambda: Throttle(log))
    # Connections still sending a request -> when they began it, oldest first.
    arriving: dict[asyncio.Protocol, float] = field(default_factory=dict)
    # Connections kept alive between requests, nothing sent yet of the next one; oldest first.
    idle: dict[asyncio.Protocol, None] = field(default_factory=dict)
    # Connections pipelining whose answers wait unread (their writing paused); oldest first.
    pipelining: dict[asyncio.Protocol, None] = field(default_factory=dict)

    def stalest(self) -> asyncio.Protocol | None:
        """The connection a newcomer may take the slot of: the one sending its request longest, if it has had
        EVICT_AFTER_S; else the one idle longest between requests; else one pipelining whose answers wait unread;
        else None."""
        oldest = next(iter(self.arriving.items()), None)
        if oldest is not None and time.monotonic() - oldest[1] >= EVICT_AFTER_S:
            return oldest[0]
        return next(iter(self.idle), None) or next(iter(self.pipelining), None)

    def accept_batch(self) -> int:
        """The listen backlog, which is also how many connections asyncio accepts at one go, before any of
        them is counted here: kept small, so that a burst cannot overshoot the limit by much."""
        return max(8, min(128, self.max_connections // 8))

    def refusal(self) -> bytes:
        message = (
            f"the HTTP API has {self.max_connections} connections open, at http.max_connections; try again shortly"
        )
        body = json.dumps(HttpError(503, message, "busy").body()).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"retry-after: 1\r\nx-request-id: {request_id()}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class BoundedProtocol(H11Protocol):
    """uvicorn's h11 protocol, counting its connections and timing how long a request takes to arrive;
    ``limits`` is bound by ``protocol``."""

    limits: Limits
    refused = False
    evicted = False  # closed for a newcomer, which took over its slot
    pipelined = False  # its request came before the answer to the one before it was whole
    deadline: asyncio.TimerHandle | None = None
    unread: asyncio.TimerHandle | None = None  # runs while the client reads nothing of what it is sent

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        victim = self.limits.stalest() if self.limits.open >= self.limits.max_connections else None
        if victim is not None:
            cast(BoundedProtocol, victim).evict()
        if self.limits.open >= self.limits.max_connections:
            self.refused = True
            transport.write(self.limits.refusal())
            transport.close()  # its descriptor is free again at once
            self.limits.throttle.say(
                "full",
                logging.WARNING,
                "HTTP: %d connections open, at http.max_connections: refusing more",
                self.limits.open,
            )
            return
        self.limits.open += 1
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        if not self.evicted:
            self.limits.open -= 1
        self._disarm()
        self._reading_again()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are no HTTP/1.1 request (a malformed request line or header, what
        follows a body longer than its Content-Length), in OpenAI's error shape as every other answer: uvicorn
        sends ``msg`` as plain text, which an SDK shows as the whole error."""
        error = HttpError(400, f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})", "bad_request")
        body = json.dumps(error.body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            (b"x-request-id", request_id().encode()),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def shutdown(self) -> None:
        """At a stop, a client that is not reading is cut off at once: the server waits for its connections,
        and for this one it would have waited until the daemon gave up on the HTTP thread (httpapi.py)."""
        if self.unread is not None:
            self._cut_off("at the stop")
            return
        super().shutdown()

    def pause_writing(self) -> None:
        """The client has stopped reading: what is sent to it waits in the transport from now on."""
        super().pause_writing()
        if self.unread is None:
            self._watch_unread()
        if self.pipelined:
            self.limits.pipelining[self] = None

    def resume_writing(self) -> None:
        super().resume_writing()
        self._reading_again()

    def _reading_again(self) -> None:
        self.limits.pipelining.pop(self, None)
        if self.unread is not None:
            self.unread.cancel()
            self.unread = None

    def _watch_unread(self) -> None:
        waiting = self.transport.get_write_buffer_size()
        self.unread = self.loop.call_later(self.limits.request_timeout_s, self._not_reading, waiting)

    def _not_reading(self, waiting: int) -> None:
        """Cut off a client that has read nothing for http.request_timeout_s (what waits for it has not shrunk:
        one reading slowly is watched again): aborted, since a close would wait for it to read what is
        buffered. Its turn, if still running, is cancelled as a hang-up's is."""
        if self.transport.get_write_buffer_size() < waiting:
            self._watch_unread()
            return
        self._cut_off(f"for http.request_timeout_s ({self.limits.request_timeout_s:.0f} s)")

    def _cut_off(self, when: str) -> None:
        self._reading_again()
        self.limits.throttle.say(
            "unread", logging.WARNING, "HTTP: a client read nothing of its answer %s: cut off", when
        )
        self.transport.abort()

    def _unsupported_upgrade_warning(self) -> None:
        """A request asking to upgrade its connection (a WebSocket, h2c) is served as HTTP/1.1: said once per
        interval, where uvicorn's own two lines each time advise installing a WebSocket library, which would
        change nothing (the door serves none, httpapi.py)."""
        self.limits.throttle.say(
            "upgrade", logging.WARNING, "HTTP: a request asked to upgrade its connection; served as HTTP/1.1"
        )

    def evict(self) -> None:
        """Close this connection, its request unfinished or not begun, or its client pipelining, and hand its
        slot over at once."""
        kind = "idle" if self in self.limits.idle else "pipelining" if self in self.limits.pipelining else "arriving"
        self.evicted = True
        self.limits.open -= 1
        self._disarm()
        self.limits.pipelining.pop(self, None)
        self.limits.throttle.say(
            f"evicted {kind}",
            logging.WARNING,
            "HTTP: %d connections open, at http.max_connections: closed one %s, for a newcomer",
            self.limits.max_connections,
            EVICTED_FOR[kind],
        )
        if kind == "pipelining":  # a close would wait for its unread answers to be read
            self.transport.abort()
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        self.pipelined = bool(self.conn.trailing_data[0])  # the next request came before this answer was whole
        super().on_response_complete()  # which starts a pipelined next request, if one came
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        # Part of a pipelined next request may have come with this one: it is arriving, timed as any other.
        # Counted idle, the first newcomer took its slot with the request half sent, and no deadline ran.
        if not self.conn.trailing_data[0]:
            self.limits.idle[self] = None
        elif self.deadline is None:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.deadline is None and self.conn.their_state is h11.IDLE:  # a next request on keep-alive
            self._arm()
        super().data_received(data)
        state = self.conn.their_state
        if state not in (h11.IDLE, h11.SEND_BODY):  # all of it came (or it failed)
            self._disarm()
        elif state is h11.IDLE and self.cycle is not None and self.cycle.response_complete:
            self._rest_came()

    def _rest_came(self) -> None:
        """The rest of a request answered before it came whole (a 401 sent before the body) has come, and
        uvicorn starts the next cycle without its keep-alive timer: the connection is idle between requests,
        unless part of the next one came too. It ran on to the answered request's deadline, and was closed
        there as a client too slow to send its request."""
        if self.conn.trailing_data[0] or self.deadline is None:
            return
        self._disarm()
        self.limits.idle[self] = None
        self._unset_keepalive_if_required()  # as uvicorn's on_response_complete: closed if it stays idle
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _arm(self) -> None:
        self.limits.idle.pop(self, None)
        self.deadline = self.loop.call_later(self.limits.request_timeout_s, self._too_slow)
        self.limits.arriving[self] = time.monotonic()

    def _disarm(self) -> None:
        self.limits.arriving.pop(self, None)
        self.limits.idle.pop(self, None)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        self.limits.arriving.pop(self, None)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY) or self.transport.is_closing():
            return
        self.limits.throttle.say(
            "slow",
            logging.WARNING,
            "HTTP: a client did not send its whole request within http.request_timeout_s (%.0f s): closed",
            self.limits.request_timeout_s,
        )
        self.transport.close()


def protocol(limits: Limits) -> type[asyncio.Protocol]:
    """The protocol class uvicorn builds each connection with, bound to the door's ``limits``."""
    return type("Bounded", (BoundedProtocol,), {"limits": limits})


class PerRequestWarnings(logging.Filter):
    """uvicorn's warnings about one request (``Invalid HTTP request received.``), said through the door's
    throttle: uvicorn logs one line per request, so a client sending them in a loop filled the log, and
    journald, past its rate limit, drops the daemon's own lines with them."""

    def __init__(self, throttle: Throttle) -> None:
        super().__init__()
        self.throttle = throttle

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        self.throttle.say(str(record.msg), logging.WARNING, "HTTP: %s", record.getMessage())  # kinds: uvicorn's few
        return False


def loop_errors(throttle: Throttle) -> Any:
    """An event-loop exception handler: running out of descriptors (or memory) for ``accept`` is said once
    per interval; asyncio itself would log a traceback for every retry, thousands a second."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            throttle.say(
                "accept",
                logging.ERROR,
                "HTTP: cannot accept connections: %s; new connections wait until descriptors are free",
                exc.strerror,
            )
            return
        loop.default_exception_handler(context)

    return handler
