"""The tcp endpoint's and the ipc socket's connections, bounded: in all, and per peer host.

ZeroMQ accepts every tcp connection and offers no cap, and a connection holds a descriptor from its
accept, before any message (and so before the secret) is read. A flood of connections, even plain TCP
ones that never speak ZMTP, would take the process's descriptors: attachments, the cloud, telemetry and
reloads would fail with EMFILE, and libzmq aborts the process when its ipc listener finds none. So the
serving loop watches the tcp socket's monitor: each accepted connection is counted by its peer's
address, and one over ``daemon.max_tcp_connections`` (never over a quarter of the open-file limit) or
over ``daemon.max_tcp_per_host`` from one address is shut down at once (libzmq then closes it). A
connection that never completes its ZMTP handshake is closed by libzmq after ``HANDSHAKE_S``.

Counting connections alone would let anyone who can reach the port hold every slot with handshaken but
silent (or secretless) connections and keep the owner's clients out. So a connection is *vouched for*
once it sends a request that passes the endpoint's secret, and a newcomer that finds its bound full
takes the slot of the oldest connection not vouched for; only when every one is vouched for is the
newcomer shut instead. Vouched-for connections are never evicted at the tcp endpoint. No grace: a
squatter that only had to keep its connections younger than one would close and reopen them faster than
the owner's client retries (and a DEALER's first message is lost with a connection refused mid-handshake),
while a client that sends at once, as locod's does, is vouched for within a round trip.

The ipc socket is bounded the same way, within an eighth of the open-file limit (fdlimit.py), its "host"
the peer's process, which holds half the bound at most: only its owner can connect, but a script of the
owner's that makes a client for each request and never closes it took every descriptor, and libzmq aborted
the daemon (and, bounded in all only, it kept out the owner's `locod status` and `stop`). Any request
vouches for an ipc connection. Past the whole bound, a newcomer from a process holding two fewer than the
process holding the most takes that one's oldest connection, vouched for or not: three processes of a worker
pool, each leaking a client a request and each under its half, held all of it. Only at the ipc socket, where
every peer is the owner's: at the tcp endpoint a peer without the secret would evict the owner's connections.
Never one with a turn in flight (``in_turn``): its answer was lost, and its client blamed the daemon or the
bound, for a newcomer as small as `locod status` or a client's liveness probe.

The monitor reports the accepted descriptor's number; before anything is done to it, the descriptor is
checked to be a socket on this endpoint's own address (the number may have been reused meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from locod.daemon.logs import Throttle
from locod.daemon.peerlink import closed_by_peer

log = logging.getLogger(__name__)

HANDSHAKE_S = 10  # a tcp connection has this long to complete its ZMTP greeting
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


@dataclass
class _Conn:
    host: str
    inode: int  # checked again before an eviction: the descriptor number may have been reused
    vouched: bool = False


class DoorGuard:
    def __init__(
        self,
        sock: zmq.Socket[bytes],
        max_total: int,
        max_per_host: int,
        bounds: tuple[str, str],
        in_turn: Callable[[], set[tuple[int, int]]] = set,
    ) -> None:
        """``bounds``: what sets ``max_total`` and ``max_per_host``, in words (a config key), for the log.
        ``in_turn``: the connections (descriptor, inode) with a turn in flight, which no greedy host loses."""
        self.max_total = max_total
        self._in_turn = in_turn
        self.max_per_host = max_per_host
        self.bounds = bounds
        self.monitor: zmq.Socket[bytes] = sock.get_monitor_socket(EVENTS)
        bound = sock.getsockopt(zmq.LAST_ENDPOINT)  # the bound address, port resolved
        assert isinstance(bound, bytes)
        endpoint = os.fsdecode(bound)  # as the kernel's name of an accepted ipc connection is decoded
        self.door, _, address = endpoint.partition("://")
        # What an accepted connection's own address holds of it: an ipc socket's path, a tcp endpoint's port
        self._local: str | int = address if self.door == "ipc" else int(address.rsplit(":", 1)[1])
        self._asked = "sent no request" if self.door == "ipc" else "sent no request with the secret"
        self._live: dict[int, _Conn] = {}  # descriptor -> the connection let in on it
        self._hosts: Counter[str] = Counter()
        # The hosts (None: all) whose closed connections this drain has looked for: once a drain, as a look
        # costs a few system calls a connection, and a flood refused at its bound had it made for each
        # newcomer, until the loop fell so far behind libzmq's accepts that the descriptors ran out.
        self._swept: set[str | None] = set()
        self.refused = 0  # connections shut: refused at their accept, or evicted for a newcomer
        self.evicted = 0
        self._throttle = Throttle(log)

    @property
    def open(self) -> int:
        return len(self._live)

    def status(self) -> dict[str, int]:
        """The connections open, refused and evicted so far, and the bound (`locod status`'s tcp and ipc
        sections)."""
        return {"open": self.open, "refused": self.refused, "evicted": self.evicted, "max": self.max_total}

    def drain(self) -> None:
        """Handle the monitor's events (called by the loop when the monitor socket is readable)."""
        self._swept.clear()
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

    def vouch(self, fd: int) -> None:
        """The connection on ``fd`` sent a request that passed the door's checks: it is never evicted at the
        tcp endpoint, and at the ipc socket only for a process holding two fewer than its own."""
        if fd not in self._live:
            self.drain()  # its ACCEPTED event may still wait in the monitor
        conn = self._live.get(fd)
        if conn is not None:
            conn.vouched = True

    def _accepted(self, fd: int) -> None:
        self._gone(fd)  # a descriptor number reused before its DISCONNECTED was read
        with _endpoint_conn(fd, self._local) as found:
            if found is None:
                return  # closed already, or the number now names another descriptor: not ours to judge
            conn, (host, inode) = found
            over = self._over(host)
            if over is not None and (scope := host if over[0] == "host" else None) not in self._swept:
                self._swept.add(scope)
                self._forget_closed(scope)
                over = self._over(host)
            while over is not None and self._evict(host if over[0] == "host" else None, over[1]):
                over = self._over(host)
            if (
                over is not None
                and over[0] == "total"
                and self.door == "ipc"
                and self._take_from_the_greediest(host, over[1])
            ):
                over = self._over(host)
            if over is None:
                self._live[fd] = _Conn(host, inode)  # in order of arrival: the oldest first
                self._hosts[host] += 1
                return
            _shut(conn)
            self.refused += 1
            kind, why = over
            self._throttle.say(kind, logging.WARNING, "%s: refused a connection from %s: %s", self.door, host, why)

    def _evict(self, host: str | None, why: str) -> bool:
        """Shut the oldest connection (from ``host``, or any) not vouched for; False if there is none."""
        fd, conn = next(
            ((fd, c) for fd, c in self._live.items() if not c.vouched and host in (None, c.host)), (None, None)
        )
        if fd is None or conn is None:
            return False
        message = "%s: %s: closed the oldest connection from %s that had %s, for a newcomer"
        return self._shut_said(fd, "evicted", message, self.door, why, conn.host, self._asked)

    def _take_from_the_greediest(self, host: str, why: str) -> bool:
        """Shut the oldest connection of the host holding the most, vouched for or not but without a turn in
        flight, when ``host`` holds at least two fewer (so that two hosts never trade one slot back and forth);
        False if it does not, or every one of that host's is answering."""
        greediest, held = self._hosts.most_common(1)[0]
        if self._hosts[host] + 1 >= held:
            return False
        busy = self._in_turn()
        idle = (fd for fd, conn in self._live.items() if conn.host == greediest and (fd, conn.inode) not in busy)
        if (fd := next(idle, None)) is None:
            return False
        message = "%s: %s: closed the oldest connection from %s, which held %d, for a newcomer from %s"
        return self._shut_said(fd, "evicted greediest", message, self.door, why, greediest, held, host)

    def _shut_said(self, fd: int, key: str, message: str, *args: object) -> bool:
        """Shut the connection on ``fd`` for a newcomer and log ``message`` (throttled per ``key``); True
        either way, as a connection closed meanwhile has freed its slot all the same."""
        if self._shut_counted(fd):
            self._throttle.say(key, logging.WARNING, message, *args)
        return True

    def _shut_counted(self, fd: int) -> bool:
        """Stop counting the connection on ``fd`` and shut it; False if it had closed meanwhile."""
        inode = self._live[fd].inode
        self._gone(fd)
        with _endpoint_conn(fd, self._local) as found:
            if found is None or found[1][1] != inode:
                return False
            _shut(found[0])
        self.evicted += 1
        self.refused += 1
        return True

    def _forget_closed(self, host: str | None) -> None:
        """Stop counting the connections (from ``host``, or any) their peers have closed: on a busy machine
        libzmq reports a close some connections late, and a client that opens one connection at a time
        (connect, ask, close) was refused at ``max_tcp_per_host`` for connections it had closed, its request
        lost. Only the host at its bound is looked at, so one host's flood costs its own few connections."""
        for fd, counted in [(fd, c) for fd, c in self._live.items() if host in (None, c.host)]:
            with _endpoint_conn(fd, self._local) as found:
                if found is None or found[1][1] != counted.inode or closed_by_peer(found[0]):
                    self._gone(fd)

    def _over(self, host: str) -> tuple[str, str] | None:
        """(kind, why) when a connection from ``host`` would pass a bound; None when it may stay."""
        if len(self._live) >= self.max_total:
            holder, held = self._hosts.most_common(1)[0]
            return "total", f"{len(self._live)} connections open ({held} from {holder}), at {self.bounds[0]}"
        if self._hosts[host] >= self.max_per_host:
            return "host", f"{self._hosts[host]} connections open from it, at {self.bounds[1]}"
        return None

    def _gone(self, fd: int) -> None:
        conn = self._live.pop(fd, None)
        if conn is not None:
            self._hosts[conn.host] -= 1
            if not self._hosts[conn.host]:
                del self._hosts[conn.host]

    def close(self) -> None:
        self.monitor.close(linger=0)


def _shut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)  # libzmq reads the end and closes its descriptor


@contextlib.contextmanager
def _endpoint_conn(fd: int, local: str | int) -> Iterator[tuple[socket.socket, tuple[str, int]] | None]:
    """A copy of descriptor ``fd`` and who is on it (its peer's host, the socket's inode), if it is a
    connection accepted on ``local`` (an ipc socket's path, a tcp endpoint's port); else None."""
    try:
        copy = os.dup(fd)
    except OSError:
        yield None
        return
    try:
        conn = socket.socket(fileno=copy)
    except OSError:  # the number names something else now, not a socket
        os.close(copy)
        yield None
        return
    with conn:
        try:
            name = conn.getsockname()
            ours = conn.type == socket.SOCK_STREAM and (name[1] if isinstance(name, tuple) else name) == local
            host = _host(conn) if ours else None
        except OSError:
            host = None
        yield None if host is None else (conn, (host, os.fstat(conn.fileno()).st_ino))


def _host(conn: socket.socket) -> str:
    """Where a connection comes from: a tcp peer's address, an ipc peer's process (as the kernel says)."""
    if conn.family != socket.AF_UNIX:
        return str(conn.getpeername()[0])
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return f"pid {struct.unpack('3i', credentials)[0]}"
