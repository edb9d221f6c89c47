"""Map an OpenAI client's whole conversation onto a daemon session, so its history is stored once.

An OpenAI client sends every earlier message with each turn; the daemon keeps a session's history itself.
After each answered turn the conversation so far (the request's messages and the answer) is remembered
under its hash, pointing at the session; the next request whose messages before the last one hash the
same continues that session, and only the messages the session does not hold yet are sent. A request
naming its session (``x-locod-session``) continues it the same way. Whenever the session's history is not
a prefix of what the client sent (expired, restarted, edited), the request carries its own history: into a
session of its own, or, for a named session, in place of the history it held. A session trimmed to
``daemon.max_history_chars`` still continues: its history is compared with the part of the conversation it
holds, and one trimmed away whole with the conversation it last answered.

With parked dialogue states (``local.cache_disk_mb``) the map outlives a restart (``kept_in``: hashes and
session ids, no text), so a chat UI's conversation continues the session whose state was parked at the stop
and resumes without its history read again; the session itself starts again from what the client sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from locod.daemon.regular_file import read_regular, written_whole
from locod.daemon.sessions import DOORS, HTTP, SessionStore

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
HASH = re.compile(r"[0-9a-f]{64}")


def fresh_session() -> str:
    return "http-" + uuid.uuid4().hex[:12]


def key(messages: Messages) -> str:
    return hashlib.sha256(json.dumps(messages, separators=(",", ":")).encode()).hexdigest()


class Conversations:
    def __init__(
        self, sessions: SessionStore, limit: int, owner: str = DOORS[HTTP], kept_in: Path | None = None
    ) -> None:
        self.sessions = sessions
        self.limit = limit
        self.owner = owner  # the door whose sessions these conversations continue (sessions.py)
        self.kept_in = kept_in  # where ``save`` writes the map at a stop, read back here
        self._known: OrderedDict[str, str] = OrderedDict()  # conversation hash -> session id
        self._lock = threading.Lock()
        if kept_in is not None:
            self._known.update(list(_saved(kept_in).items())[-limit:])

    def continuing(self, messages: Messages, named: str | None, answered: threading.Event) -> tuple[str, Messages]:
        """(session id, the messages to send): the named session, else the one this conversation's prefix
        maps to; the messages it does not hold yet. A conversation not seen gets a session of its own, with
        all of its messages (a turn without a session keeps no history in the daemon). The caller has waited
        for a named session's earlier turns (``SessionStore.enter``, ``wait_turn``); a mapped one is entered here
        for the turn whose reply sets ``answered``, unless a turn of it is in flight (the same chat sent twice
        at once): then the conversation gets a session of its own."""
        session = named
        if session is None:
            with self._lock:
                session = self._known.get(key(messages[:-1]))
            if session is None or not self.sessions.enter(session, self.owner, answered, behind=False):
                return fresh_session(), messages
        start, held = self.sessions.held(session, self.owner)  # a trimmed history holds the conversation from ``start``
        end = start + len(held)
        if end < len(messages) and (messages[start:end] == held if held else self._was(messages[:start], session)):
            return session, messages[end:]
        if not held and not start and named is None:  # gone (expired, or lost with a restart): the session it
            return session, messages  # had takes its history again, and a state parked under it resumes it
        if named is None:
            self.sessions.leave(session, self.owner, answered)
            return fresh_session(), messages
        if any(m["role"] == "assistant" for m in messages):  # a whole conversation, not the session's: it replaces
            self.sessions.restart(named, self.owner, answered)  # the history, which would otherwise go before
            # it, once this turn is answered: a refused one leaves the session's history as it was
        return named, messages

    def _was(self, conversation: Messages, session: str) -> bool:
        """Whether ``session`` answered ``conversation`` last: so a history trimmed away whole (its last message
        longer than ``daemon.max_history_chars``) is known to be the start of the conversation sent."""
        with self._lock:
            return self._known.get(key(conversation)) == session

    def answered(self, messages: Messages, answer: str, session: str) -> None:
        """Remember the conversation now including ``answer``, for its next turn."""
        with self._lock:
            self._known[key([*messages, {"role": "assistant", "content": answer}])] = session
            while len(self._known) > self.limit:
                self._known.popitem(last=False)

    def save(self) -> None:
        """Write the map to ``kept_in`` (at a stop), whole or not at all; a failure is one log line."""
        if self.kept_in is None:
            return
        with self._lock:
            known = json.dumps(dict(self._known))
        part = self.kept_in.with_name(self.kept_in.name + ".part")
        try:  # made anew: a FIFO there would hold the stop; synced: a power cut after a stop leaves no empty map
            with written_whole(self.kept_in, part) as out:
                out.write(known.encode())
        except OSError as exc:
            log.warning("the HTTP conversations were not kept for the next start: %s: %s", part, exc.strerror or exc)


def _saved(path: Path) -> dict[str, str]:
    """The map ``save`` wrote, or nothing: none there, or a file that is not one (one log line)."""
    try:
        known = json.loads(read_regular(path, 64 << 20))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        log.warning(
            "ignored %s, not the HTTP conversations locod keeps: %s", path, getattr(exc, "strerror", None) or exc
        )
        return {}
    if not isinstance(known, dict) or not all(
        isinstance(k, str) and HASH.fullmatch(k) and isinstance(v, str) and 0 < len(v) <= 200 for k, v in known.items()
    ):
        log.warning("ignored %s, not the HTTP conversations locod keeps: not a map of hashes to sessions", path)
        return {}
    return known
