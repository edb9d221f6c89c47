"""Whether a socket client whose turns are in flight is still connected.

ZeroMQ tells the daemon that a client is gone only when a frame for it fails (ROUTER_MANDATORY), and a
turn waiting for the local model, or for a silent cloud endpoint, sends none. So a client that left while
its turns were queued had each of them, on its turn, recorded as accepted and its whole prompt read before
the ``decision`` frame found it gone (an HTTP client's hang-up is seen while it waits). The serving loop
therefore remembers the connection each request came on, by its descriptor and the socket's inode (libzmq
closes the descriptor once it sees the end, and the number may then name another connection), and looks
every second whether it is still open.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """One client connection of a ZeroMQ socket, as the descriptor libzmq reads it on."""

    fd: int
    inode: int

    @classmethod
    def of(cls, fd: int) -> Link | None:
        """The connection on ``fd`` (a message's ``SRCFD``); None if there is none to look at."""
        try:
            return cls(fd, os.fstat(fd).st_ino)
        except OSError:
            return None

    def closed(self) -> bool:
        """Whether the client has closed the connection, or libzmq already has (the descriptor is gone or is
        another file). A peek: nothing is taken from what libzmq reads."""
        try:
            copy = os.dup(self.fd)
        except OSError:
            return True
        try:
            conn = socket.socket(fileno=copy) if os.fstat(copy).st_ino == self.inode else None
        except OSError:  # the number names something else now, not a socket
            conn = None
        if conn is None:
            os.close(copy)
            return True
        with conn:
            return closed_by_peer(conn)


def closed_by_peer(conn: socket.socket) -> bool:
    """Whether the peer has closed ``conn``: a peek, so nothing is taken from what libzmq reads."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the peer
        return True


def vanished(links: dict[bytes, Link], peers: set[bytes]) -> list[bytes]:
    """Of ``peers`` (those with turns in flight), the ones whose connection has closed; the links of
    clients no longer among them are forgotten."""
    for peer in [p for p in links if p not in peers]:
        del links[peer]
    return [peer for peer, link in links.items() if link.closed()]
