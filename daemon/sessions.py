"""Dialogue sessions: the history a session id carries from turn to turn, expired after idle time.

History lives in memory only: a restarted daemon starts every session afresh (a chat naming an unknown
session simply opens it). A turn without a session id gets a session of its own that the store does not
keep, so one-off turns take no slot. The store holds at most ``max_sessions``; when it is full, the client
(connection) holding the most sessions gives up its least recently used one, so a client that opens
sessions by the thousand evicts its own, not another's. The per-turn trail (where each turn ran, which
attachment slots went to the cloud) is what the routing policy sees as dialogue history.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TurnTrail:
    location: str
    slots_sent: tuple[bool, ...]
    task: str


@dataclass
class Session:
    id: str
    messages: list[dict[str, str]] = field(default_factory=list)
    trail: list[TurnTrail] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    client: Hashable = None  # the client that used it last: eviction is fair across clients

    @property
    def turns(self) -> int:
        return len(self.trail)


class SessionStore:
    def __init__(self, idle_s: float, max_sessions: int) -> None:
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, session_id: str | None, client: Hashable = None) -> Session:
        """The live session with this id (a new one if unknown or expired); for None a fresh one, unkept."""
        now = time.monotonic()
        if session_id is None:
            return Session("anon-" + uuid.uuid4().hex[:12], client=client)
        with self._lock:
            self._expire(now)
            session = self._sessions.get(session_id)
            if session is None:
                if len(self._sessions) >= self.max_sessions:
                    self._evict()
                session = self._sessions[session_id] = Session(session_id)
            session.last_used, session.client = now, client
            return session

    def _evict(self) -> None:
        """Drop the least recently used session of the client that holds the most."""
        held = Counter(s.client for s in self._sessions.values())
        most = max(held.values())
        oldest = min((s for s in self._sessions.values() if held[s.client] == most), key=lambda s: s.last_used)
        del self._sessions[oldest.id]

    def history(self, session_id: str) -> list[dict[str, str]]:
        """A copy of a live session's messages ([] if there is none); opens nothing."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or time.monotonic() - session.last_used > self.idle_s:
                return []
            return list(session.messages)

    def record(self, session: Session, user: list[dict[str, str]], answer: str, trail: TurnTrail) -> None:
        """Append a finished turn: the new user messages and the answer become history."""
        with self._lock:
            session.messages.extend(user)
            session.messages.append({"role": "assistant", "content": answer})
            session.trail.append(trail)
            session.last_used = time.monotonic()

    def _expire(self, now: float) -> None:
        for sid in [s.id for s in self._sessions.values() if now - s.last_used > self.idle_s]:
            del self._sessions[sid]

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._sessions)
