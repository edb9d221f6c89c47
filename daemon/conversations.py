"""Map an OpenAI client's whole conversation onto a daemon session, so its history is stored once.

An OpenAI client sends every earlier message with each turn; the daemon keeps a session's history itself.
After each answered turn the conversation so far (the request's messages and the answer) is remembered
under its hash, pointing at the session; the next request whose messages before the last one hash the
same continues that session, and only the messages the session does not hold yet are sent. A request
naming its session (``x-locod-session``) continues it the same way. Whenever the session's history is not
a prefix of what the client sent (expired, restarted, edited), the request carries its own history. A
session trimmed to ``daemon.max_history_chars`` still continues: its history is compared with the part of
the conversation it holds.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import OrderedDict

from locod.daemon.sessions import DOORS, HTTP, SessionStore

Messages = list[dict[str, str]]


def fresh_session() -> str:
    return "http-" + uuid.uuid4().hex[:12]


def key(messages: Messages) -> str:
    return hashlib.sha256(json.dumps(messages, separators=(",", ":")).encode()).hexdigest()


class Conversations:
    def __init__(self, sessions: SessionStore, limit: int, owner: str = DOORS[HTTP]) -> None:
        self.sessions = sessions
        self.limit = limit
        self.owner = owner  # the door whose sessions these conversations continue (sessions.py)
        self._known: OrderedDict[str, str] = OrderedDict()  # conversation hash -> session id
        self._lock = threading.Lock()

    def continuing(self, messages: Messages, named: str | None) -> tuple[str | None, Messages]:
        """(session id, the messages to send): the named session, else the one this conversation's prefix
        maps to; the messages it does not hold yet. A conversation not seen gets a session of its own, with
        all of its messages (a turn without a session keeps no history in the daemon)."""
        session = named
        if session is None:
            with self._lock:
                session = self._known.get(key(messages[:-1]))
            if session is None:
                return fresh_session(), messages
        start, held = self.sessions.held(session, self.owner)  # a trimmed history holds the conversation from ``start``
        end = start + len(held)
        if held and end < len(messages) and messages[start:end] == held:
            return session, messages[end:]
        return named or fresh_session(), messages

    def answered(self, messages: Messages, answer: str, session: str) -> None:
        """Remember the conversation now including ``answer``, for its next turn."""
        with self._lock:
            self._known[key([*messages, {"role": "assistant", "content": answer}])] = session
            while len(self._known) > self.limit:
                self._known.popitem(last=False)
