"""Replies waiting for a client that reads slowly, bounded in bytes per client.

ZeroMQ bounds what it queues for a peer in messages (SNDHWM), not bytes: a client that never reads can
ask for 600 two-megabyte ``decisions`` replies, and every one fits under any message count. So the
ROUTER sockets keep a short pipe per peer (``PIPE_MESSAGES``), and what does not fit waits here, counted
in bytes. A client whose waiting replies pass ``limit`` bytes is dropped: they are discarded, and the
caller cancels its turns. Only the loop's thread touches a Backlog.
"""

from __future__ import annotations

from collections import deque

# Frames ZeroMQ may hold for one peer beyond this backlog (its SNDHWM).
PIPE_MESSAGES = 16


class Backlog:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._frames: dict[bytes, deque[bytes]] = {}
        self._bytes: dict[bytes, int] = {}

    def __bool__(self) -> bool:
        return bool(self._frames)

    def __contains__(self, peer: bytes) -> bool:
        return peer in self._frames

    def add(self, peer: bytes, frame: bytes) -> bool:
        """Queue ``frame`` behind the peer's others; False, with all of them discarded, past the limit."""
        total = self._bytes.get(peer, 0) + len(frame)
        if total > self.limit:
            self.discard(peer)
            return False
        self._frames.setdefault(peer, deque()).append(frame)
        self._bytes[peer] = total
        return True

    def peers(self) -> list[bytes]:
        return list(self._frames)

    def first(self, peer: bytes) -> bytes | None:
        frames = self._frames.get(peer)
        return frames[0] if frames else None

    def pop(self, peer: bytes) -> None:
        """Forget the peer's first frame (it was sent)."""
        frames = self._frames[peer]
        self._bytes[peer] -= len(frames.popleft())
        if not frames:
            self.discard(peer)

    def discard(self, peer: bytes) -> None:
        self._frames.pop(peer, None)
        self._bytes.pop(peer, None)

    def queued_bytes(self) -> int:
        return sum(self._bytes.values())
