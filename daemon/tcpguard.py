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

A newcomer that finds its bound full is not judged at once: the connections it would count against may be
closing already (a client that closes one connection and opens the next: libzmq closes the old descriptor from
its reaper thread, after the new connect may have reached the daemon, and the daemon's own monitor reports a
close after the next accept). Judged at once, it was shut, or an older live connection evicted for it, though
the slots were in fact free, and a request it had sent was lost: locod's own client sends a read-only one
again, any other client waited out its timeout. So it *settles*: for up to ``SETTLE_S`` it waits, uncounted,
its requests held unread by the loop, and is let in (its requests then answered, in order) as soon as the
closes on their way free a slot, oldest first (a slot found free by another newcomer's sweep too); only then is it
judged as above (its held requests dropped if it is shut). One that closes while it settles has what it sent
answered all the same, as any connection's requests that came before its close are, but a chat turn: never let in,
never acknowledged, it would run and be recorded for nobody (the loop drops it).
At most ``MAX_SETTLING`` wait at once: past them a newcomer is judged at its accept, so a flood costs no more
descriptors than before. Their held requests take ``MAX_HELD_BYTES`` at most: past it, the newcomer holding the most
is judged at once, not the one whose request crossed it (a small request behind a big one, which cost it), and
judging it alone brings them back within it.

The monitor reports the accepted descriptor's number; before anything is done to it, the descriptor is
checked to be a socket on this endpoint's own address (the number may have been reused meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from locod.daemon.logs import Throttle
from locod.daemon.peerlink import closed_by_peer

log = logging.getLogger(__name__)

HANDSHAKE_S = 10  # a tcp connection has this long to complete its ZMTP greeting
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
SETTLE_S = 0.25  # how long a newcomer over a bound waits for the closes on their way before it is judged
MAX_SETTLING = 8  # newcomers waiting so at once; one more is judged at its accept
MAX_HELD_BYTES = 64 << 20  # what their held requests may take in all; past it, the one holding most is judged at once

Request = list[bytes]  # a message's frames, its routing id first


@dataclass
class _Conn:
    host: str
    inode: int  # checked again before an eviction: the descriptor number may have been reused
    vouched: bool = False


@dataclass
class _Newcomer:
    """A connection over a bound, waiting for the closes on their way (``SETTLE_S``) before it is judged."""

    conn: _Conn
    judged_at: float  # time.monotonic()
    held: list[Request] = field(default_factory=list)  # its requests, read meanwhile and not answered

    @property
    def held_bytes(self) -> int:
        return sum(len(frame) for request in self.held for frame in request)


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
        # The hosts (None: all) whose closed connections this drain (or settling) has looked for: once, as a look
        # costs a few system calls a connection, and a flood refused at its bound had it made for each
        # newcomer, until the loop fell so far behind libzmq's accepts that the descriptors ran out.
        self._swept: set[str | None] = set()
        self._settling: dict[int, _Newcomer] = {}  # descriptor -> a newcomer over a bound, in order of arrival
        # The held requests to answer now, in order, each with whether its newcomer was let in (False: it closed
        # while it settled)
        self._to_answer: dict[int, list[tuple[Request, bool]]] = {}
        # The descriptors of newcomers that closed while they settled, until the number is accepted again: what
        # libzmq still had of theirs in its pipe is read after the close
        self._closed_settling: set[int] = set()
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
                self._let_in_those_that_fit()

    def hold(self, fd: int, request: Request) -> bool:
        """Keep ``request``, come on ``fd``, unanswered while its connection settles (or until the held ones
        before it are answered); False when it may be answered now."""
        if fd not in self._live and fd not in self._settling:
            self.drain()  # its ACCEPTED event may still wait in the monitor
        if (newcomer := self._settling.get(fd)) is not None:
            newcomer.held.append(request)
            if sum(n.held_bytes for n in self._settling.values()) > MAX_HELD_BYTES:  # unlike libzmq's pipes
                self._judge_settled(max(self._settling, key=lambda waiting: self._settling[waiting].held_bytes))
            return True
        if fd in self._to_answer or fd in self._closed_settling:
            self._to_answer.setdefault(fd, []).append((request, fd not in self._closed_settling))
            return True
        return False

    def settle(self) -> list[tuple[int, Request, bool]]:
        """Judge the newcomers whose wait is over; the held requests (descriptor, frames, whether the newcomer
        was let in) of those let in meanwhile, or closed while they settled, in order, for the loop to answer
        now."""
        self._swept.clear()
        now = time.monotonic()
        for fd in [fd for fd, newcomer in self._settling.items() if newcomer.judged_at <= now]:
            if fd in self._settling:  # not let in meanwhile, by a slot the judging of one before it found free
                self._judge_settled(fd)
        answer_now = [(fd, *held) for fd, requests in self._to_answer.items() for held in requests]
        self._to_answer.clear()
        return answer_now

    def _judge_settled(self, fd: int) -> None:
        """Judge the newcomer waiting on ``fd`` now; one that has closed meanwhile is gone (``_gone``)."""
        newcomer = self._settling[fd]
        with _endpoint_conn(fd, self._local) as found:
            if found is None or found[1][1] != newcomer.conn.inode or closed_by_peer(found[0]):
                self._gone(fd)
                return
            del self._settling[fd]
            self._judge(fd, found[0], newcomer)

    def wait_ms(self, longest: int) -> int:
        """How long the loop may wait for events, at most ``longest``: until the next newcomer is judged."""
        if self._to_answer:  # held requests that ``settle`` hands over: answered now, not after the poll's wait
            return 0
        if not self._settling:
            return longest
        first = min(newcomer.judged_at for newcomer in self._settling.values())
        return max(0, min(longest, int((first - time.monotonic()) * 1000) + 1))

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
        self._closed_settling.discard(fd)
        with _endpoint_conn(fd, self._local) as found:
            if found is None:
                return  # closed already, or the number now names another descriptor: not ours to judge
            conn, (host, inode) = found
            newcomer = _Newcomer(_Conn(host, inode), time.monotonic() + SETTLE_S)
            if self._sweep_over(host) is None:
                self._admit(fd, newcomer)
            elif len(self._settling) < MAX_SETTLING:
                self._settling[fd] = newcomer
            else:
                self._judge(fd, conn, newcomer)

    def _sweep_over(self, host: str) -> tuple[str, str] | None:
        """``_over``, once the connections its bound counts that have closed are forgotten, and the newcomers
        already waiting let in to the slots they held: a newcomer whose accept found them took one first, and
        the one waiting for exactly that close was judged when its wait was over."""
        over = self._over(host)
        if over is not None and (scope := host if over[0] == "host" else None) not in self._swept:
            self._swept.add(scope)
            self._forget_closed(scope)
            self._let_in_those_that_fit()
            over = self._over(host)
        return over

    def _let_in_those_that_fit(self) -> None:
        """Let in the newcomers, oldest first, that a connection's close has left room for."""
        for fd, newcomer in list(self._settling.items()):
            if self._over(newcomer.conn.host) is None:
                del self._settling[fd]
                self._admit(fd, newcomer)

    def _admit(self, fd: int, newcomer: _Newcomer) -> None:
        self._live[fd] = newcomer.conn  # in order of arrival: the oldest first
        self._hosts[newcomer.conn.host] += 1
        if newcomer.held:  # after a closed one's on this number, if any
            self._to_answer.setdefault(fd, []).extend((request, True) for request in newcomer.held)

    def _judge(self, fd: int, conn: socket.socket, newcomer: _Newcomer) -> None:
        """Let in a newcomer over a bound in place of the oldest connection not vouched for (or of the greediest
        process's, at the ipc socket); else shut it, dropping its held requests."""
        host = newcomer.conn.host
        over = self._sweep_over(host)
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
            self._admit(fd, newcomer)
            return
        _shut(conn)
        self.refused += 1
        kind, why = over
        self._throttle.say(kind, logging.WARNING, "%s: refused a connection from %s: %s", self.door, host, why)

    def _evict(self, host: str | None, why: str) -> bool:
        """Shut the oldest connection (from ``host``, or any) not vouched for; False if there is none. One let in
        with held requests not answered yet is spared: a flood of newcomers judged before the loop answered them
        evicted it, its requests lost."""
        fd, conn = next(
            (
                (fd, c)
                for fd, c in self._live.items()
                if not c.vouched and fd not in self._to_answer and host in (None, c.host)
            ),
            (None, None),
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
        idle = (
            fd
            for fd, conn in self._live.items()
            if conn.host == greediest and (fd, conn.inode) not in busy and fd not in self._to_answer
        )
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
        """Stop counting the connection on ``fd``, closed. What it sent while it settled is handed to the loop
        all the same (``settle``), as a request is that came on any connection before it closed: a client that
        sent a label or a reload and closed at once lost it, silently, where the bound was full. The loop drops
        a chat turn among them (server.py), which was never let in."""
        newcomer = self._settling.pop(fd, None)
        if newcomer is not None:
            self._closed_settling.add(fd)
            self._to_answer.setdefault(fd, []).extend((request, False) for request in newcomer.held)
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
