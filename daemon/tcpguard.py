"""The tcp endpoint's connections, bounded: in all, and per peer host.

ZeroMQ accepts every tcp connection and offers no cap, and a connection holds a descriptor from its
accept, before any message (and so before the secret) is read. A flood of connections, even plain TCP
ones that never speak ZMTP, would take the process's descriptors: attachments, the cloud, telemetry and
reloads would fail with EMFILE, and libzmq aborts the process when its ipc listener finds none. So the
serving loop watches the tcp socket's monitor: each accepted connection is counted by its peer's
address, and one over ``daemon.max_tcp_connections`` (never over a quarter of the open-file limit) or
over ``daemon.max_tcp_per_host`` from one address is shut down at once (libzmq then closes it). A
connection that never completes its ZMTP handshake is closed by libzmq after ``HANDSHAKE_S``.

The monitor reports the accepted descriptor's number; before anything is done to it, the descriptor is
checked to be a socket on this endpoint's own address (the number may have been reused meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import Counter

import zmq
from zmq.utils.monitor import recv_monitor_message

from locod.daemon.logs import Throttle

log = logging.getLogger(__name__)

HANDSHAKE_S = 10  # a tcp connection has this long to complete its ZMTP greeting
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


class TcpGuard:
    def __init__(self, sock: zmq.Socket[bytes], max_total: int, max_per_host: int) -> None:
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.monitor: zmq.Socket[bytes] = sock.get_monitor_socket(EVENTS)
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the bound address, port resolved
        self._port = int(endpoint.rsplit(":", 1)[1])
        self._live: dict[int, str] = {}  # descriptor -> peer host, for the connections let in
        self._hosts: Counter[str] = Counter()
        self.refused = 0
        self._throttle = Throttle(log)

    @property
    def open(self) -> int:
        return len(self._live)

    def drain(self) -> None:
        """Handle the monitor's events (called by the loop when the monitor socket is readable)."""
        for _ in range(1000):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            else:
                self._gone(fd)

    def _accepted(self, fd: int) -> None:
        self._gone(fd)  # a descriptor number reused before its DISCONNECTED was read
        try:
            copy = os.dup(fd)
        except OSError:
            return  # closed already
        try:
            conn = socket.socket(fileno=copy)
        except OSError:  # the number names something else now, not a socket
            os.close(copy)
            return
        with conn:
            try:
                if conn.type != socket.SOCK_STREAM or conn.getsockname()[1] != self._port:
                    return  # the number now names another descriptor: not ours to judge
                host = str(conn.getpeername()[0])
            except OSError:
                return
            over = self._over(host)
            if over is None:
                self._live[fd] = host
                self._hosts[host] += 1
                return
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # libzmq reads the end and closes its descriptor
            self.refused += 1
            kind, why = over
            self._throttle.say(kind, logging.WARNING, "tcp: refused a connection from %s: %s", host, why)

    def _over(self, host: str) -> tuple[str, str] | None:
        """(kind, why) when a connection from ``host`` would pass a bound; None when it may stay."""
        if len(self._live) >= self.max_total:
            return "total", f"{len(self._live)} connections open, at daemon.max_tcp_connections"
        if self._hosts[host] >= self.max_per_host:
            return "host", f"{self._hosts[host]} connections open from it, at daemon.max_tcp_per_host"
        return None

    def _gone(self, fd: int) -> None:
        host = self._live.pop(fd, None)
        if host is not None:
            self._hosts[host] -= 1
            if not self._hosts[host]:
                del self._hosts[host]

    def close(self) -> None:
        self.monitor.close(linger=0)
