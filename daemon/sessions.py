"""Dialogue sessions: the history a session id carries from turn to turn, expired after idle time.

History lives in memory only: a restarted daemon starts every session afresh (a chat naming an unknown
session simply opens it). A turn without a session id gets a session of its own that the store does not
keep, so one-off turns take no slot. The per-turn trail (where each turn ran, which
attachment slots went to the cloud) is what the routing policy sees as dialogue history.

Sessions are namespaced by **door**, the owner: a session id names a dialogue of the ipc socket's user, of
the tcp endpoint's or of the HTTP API's, and the same id at another door is another dialogue. Each door
has one kind of peer: the ipc socket (0600 in a 0700 directory) admits the daemon's own user only, the tcp
endpoint whoever holds its secret (any local process on loopback without one), the HTTP API whoever holds
its key (any local process on loopback without one). So a peer of one door can neither continue, read
through the model, nor evict another door's dialogues; within a door without authentication, every local
user is that door's peer (docs/protocol.md says so). The store holds at most ``max_sessions``; when it
is full, the door holding the most sessions gives up its least recently used one, so a flood through one
door (however many connections it opens, one session each) leaves another door at least half the store.

A session's history is bounded (``daemon.max_history_chars``): past it the oldest messages are dropped, so
neither memory nor what a cloud turn uploads grows with the dialogue; of its turns' trail only the last ``Z``
(what the policy reads) are kept. An answer made from private material (a private attachment, or history
holding such an answer) is marked: the local model sees it, a cloud model gets ``WITHHELD`` in its place
(``Session.shareable``).

A session answers one turn at a time, in arrival order (``SessionStore.enter``, ``wait_turn``): each turn's
history, turn number and kept KV state follow from the turn before it, so a turn naming a session whose
earlier turn is still in flight waits for its answer rather than run beside it on the same history.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from locod.policy.observation import Z
from locod.protocol import QUEUED_EVERY_S

# A client key's first byte: the door it came through. The serving loop and the HTTP API tag their clients
# with these, so the per-client limits and the sessions' namespaces agree on who is who.
IPC, TCP, HTTP = b"i", b"t", b"h"
DOORS = {IPC: "ipc", TCP: "tcp", HTTP: "http"}
# How often a turn waiting for its session's earlier turns looks whether it was cancelled, its client gone
# (the turn ahead answering wakes it at once): each look scans the session's queue, so many waiters looking
# often cost a core. The socket's turns wait so on the turn pool, the HTTP door's on threads of their own.
WAIT_STEP_S = 0.25


def door_of(client: bytes) -> str:
    """The door (the owner of its sessions) a client key came through: ``ipc``, ``tcp`` or ``http``."""
    return DOORS.get(client[:1], "other")


WITHHELD = "[answer left out: it was made from a private attachment, which stays on the device]"


@dataclass(frozen=True)
class TurnTrail:
    location: str
    slots_sent: tuple[bool, ...]
    task: str


Message = dict[str, str]


@dataclass
class Session:
    id: str
    trail: list[TurnTrail] = field(default_factory=list)  # the last Z turns': all the policy reads
    turns: int = 0  # turns answered in the whole dialogue
    last_used: float = field(default_factory=time.monotonic)
    owner: str = ""  # the door it belongs to (``door_of``): its namespace, and whose budget it counts in
    dropped: int = 0  # messages trimmed off the front: where the history starts in the whole dialogue
    # The history, and per message whether it was made from private material: one tuple, replaced whole by
    # ``SessionStore.record``, so a turn reading it on another thread never pairs a message with another's mark.
    dialogue: tuple[tuple[Message, ...], tuple[bool, ...]] = ((), ())
    # A copy, its history started afresh, that a restarting turn answers on (``SessionStore.restart``): the
    # store's session is replaced by it only once that turn's answer is recorded.
    replacing: bool = False

    @property
    def key(self) -> str:
        """Unique across doors: what the dialogue cache keeps this session's KV state under."""
        return f"{self.owner}:{self.id}"

    @property
    def messages(self) -> list[Message]:
        return list(self.dialogue[0])

    @property
    def withheld(self) -> int:
        """How many messages of the history a cloud model is not sent (made from private material)."""
        return sum(self.dialogue[1])

    def shareable(self) -> list[Message]:
        """The history as a cloud model may see it: each answer made from private material replaced."""
        messages, private = self.dialogue
        return [{"role": m["role"], "content": WITHHELD} if p else m for m, p in zip(messages, private)]


class SessionStore:
    def __init__(self, idle_s: float, max_sessions: int, max_chars: int = 100_000) -> None:
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.max_chars = max_chars
        self._sessions: dict[tuple[str, str], Session] = {}  # (owner, id) -> session
        # (owner, id) -> the ``answered`` events of the replies of its turns in flight, in arrival order (``enter``)
        self._turning: dict[tuple[str, str], list[threading.Event]] = {}
        # (owner, id) -> the ``answered`` event of the turn that starts its history afresh (``restart``)
        self._restarts: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def open(self, session_id: str | None, owner: str, answered: threading.Event | None = None) -> Session:
        """``owner``'s live session with this id (a new one if unknown or expired); for None a fresh one,
        unkept. For the turn whose reply sets ``answered``, if it restarts the session (``restart``), a copy
        with its history emptied."""
        now = time.monotonic()
        if session_id is None:
            return Session("anon-" + uuid.uuid4().hex[:12], owner=owner)
        with self._lock:
            self._expire(now)
            session = self._sessions.get((owner, session_id))
            if session is not None and now - session.last_used > self.idle_s:
                # Expired, and kept by ``_expire`` only for the turns queued in it, this one first: those before
                # it have answered (``wait_turn``), so it is no turn in flight that ``_expire`` keeps it for.
                del self._sessions[owner, session_id]
                session = None
            if session is None:
                if len(self._sessions) >= self.max_sessions:
                    self._evict()
                session = self._sessions[owner, session_id] = Session(session_id, owner=owner)
            session.last_used = now
            if answered is not None and self._restarts.get((owner, session_id)) is answered:
                del self._restarts[owner, session_id]
                return dataclasses.replace(session, dialogue=((), ()), dropped=0, replacing=True)
            return session

    def enter(self, session_id: str, owner: str, answered: threading.Event, *, behind: bool = True) -> bool:
        """Queue a turn of ``owner``'s session: the turn whose reply sets ``answered`` once it has said its last
        frame. Its turns run in arrival order, each once those before it have answered (``wait_turn``). With
        ``behind`` False the session takes it only if no turn of it is in flight (False: not queued). A turn
        entered again keeps its place. A live session is used from now: a turn that arrived before it expired
        is not handed it emptied by ``open`` (its attachments read in between, or the HTTP door having sent
        only the messages it held)."""
        key = (owner, session_id)
        with self._lock:
            queue = [turn for turn in self._turning.get(key, ()) if not turn.is_set()]
            if answered not in queue:
                if queue and not behind:
                    return False
                queue.append(answered)
            self._turning[key] = queue
            now = time.monotonic()
            if (session := self._sessions.get(key)) is not None and now - session.last_used <= self.idle_s:
                session.last_used = now
            if len(self._turning) > self.max_sessions:  # sessions whose turns all answered wait for nothing
                self._turning = {k: q for k, q in self._turning.items() if any(not t.is_set() for t in q)}
            return True

    def _ahead_of(self, session_id: str, owner: str, answered: threading.Event) -> list[threading.Event]:
        """The ``answered`` events of the turns of ``owner``'s session entered before this one, not set yet."""
        with self._lock:
            queue = self._turning.get((owner, session_id), [])
            mine = next((i for i, turn in enumerate(queue) if turn is answered), len(queue))
            return [turn for turn in queue[:mine] if not turn.is_set()]

    def wait_turn(
        self,
        session_id: str,
        owner: str,
        answered: threading.Event,
        cancelled: threading.Event,
        on_wait: Callable[[int], None] | None = None,
    ) -> bool:
        """Wait until the turns of the session entered before this one have answered, so its history holds their
        answers; False if ``cancelled`` is set first. ``on_wait(ahead)`` is called as the local model's gate
        calls it: when the turn starts waiting, when the turns ahead change, and every ``QUEUED_EVERY_S``."""
        told: tuple[int, float] | None = None  # (turns ahead, when) last told
        while ahead := self._ahead_of(session_id, owner, answered):
            if cancelled.is_set():
                return False
            now = time.monotonic()
            if on_wait is not None and (told is None or told[0] != len(ahead) or now - told[1] >= QUEUED_EVERY_S):
                told = (len(ahead), now)
                on_wait(len(ahead))
            ahead[-1].wait(WAIT_STEP_S)  # the turn just ahead answering wakes it; a cancel is seen within a step
        return True

    def leave(self, session_id: str, owner: str, answered: threading.Event) -> None:
        """Take a turn out of the session's queue: it runs in another session, or its client left before it ran."""
        key = (owner, session_id)
        with self._lock:
            queue = [turn for turn in self._turning.pop(key, []) if turn is not answered]
            if queue:
                self._turning[key] = queue

    @property
    def waiting(self) -> int:
        """Turns waiting for an earlier turn of their session to answer."""
        with self._lock:
            return sum(max(0, sum(not turn.is_set() for turn in queue) - 1) for queue in self._turning.values())

    def restart(self, session_id: str, owner: str, answered: threading.Event) -> None:
        """Have the turn whose reply sets ``answered`` (the session's turn now: ``wait_turn``) answer on an
        empty history, which the conversation its client sent replaces (its turns go on counting). The
        session's history is replaced when that turn's answer is recorded (``record``): a turn refused (busy,
        the daily cap, a prompt too long) or failed leaves the session as it was, for its next turn."""
        with self._lock:
            self._restarts = {key: turn for key, turn in self._restarts.items() if not turn.is_set()}
            self._restarts[owner, session_id] = answered

    def _turning_now(self, key: tuple[str, str]) -> bool:
        """Whether a turn of the session ``key`` names is in flight (``enter``)."""
        return any(not turn.is_set() for turn in self._turning.get(key, ()))

    def _evict(self) -> None:
        """Drop the least recently used session of the owner (door) that holds the most. A session with a turn
        in flight is not dropped (its answer would go to a session no longer kept, the next turn starting it
        afresh): when every one has, the store holds one more until they end (at most the turns in flight)."""
        held = Counter(s.owner for s in self._sessions.values())
        idle = [s for key, s in self._sessions.items() if not self._turning_now(key)]
        if idle:
            oldest = min(idle, key=lambda s: (-held[s.owner], s.last_used))
            del self._sessions[oldest.owner, oldest.id]

    def held(self, session_id: str, owner: str) -> tuple[int, list[Message]]:
        """(messages trimmed off the front, a copy of the rest) of ``owner``'s live session; (0, []) if there
        is none."""
        with self._lock:
            session = self._sessions.get((owner, session_id))
            if session is None or time.monotonic() - session.last_used > self.idle_s:
                return 0, []
            return session.dropped, session.messages

    def record(
        self,
        session: Session,
        user: list[Message],
        answer: str,
        trail: TurnTrail,
        private: bool = False,
        sent_private: frozenset[int] = frozenset(),
    ) -> None:
        """Append a finished turn: the new user messages and the answer become history (``private``: the
        answer was made from private material; ``sent_private``: which of ``user`` are such answers, sent
        back by the client), then trim the history to ``max_chars``. A restarting turn's copy (``open``)
        takes the stored session's place."""
        with self._lock:
            if session.replacing:
                session.replacing = False
                self._sessions[session.owner, session.id] = session
            messages = [*session.dialogue[0], *user, {"role": "assistant", "content": answer}]
            marks = [*session.dialogue[1], *(i in sent_private for i in range(len(user))), private]
            drop = overflow(messages, self.max_chars)
            session.dialogue = (tuple(messages[drop:]), tuple(marks[drop:]))
            session.dropped += drop
            session.trail = [*session.trail, trail][-Z:]
            session.turns += 1
            session.last_used = time.monotonic()

    def _expire(self, now: float) -> None:
        """Drop the sessions idle past ``idle_s``: not one whose turn, longer than that, is still in flight."""
        for key in [k for k, s in self._sessions.items() if now - s.last_used > self.idle_s]:
            if not self._turning_now(key):
                del self._sessions[key]

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._sessions)


def overflow(messages: list[Message], max_chars: int) -> int:
    """How many messages to drop from the front so the rest holds at most ``max_chars`` characters and
    starts at a user message: the oldest go first, as when a prompt is fitted to a context."""
    total = sum(len(m["content"]) for m in messages)
    drop = 0
    while drop < len(messages) and (total > max_chars or messages[drop]["role"] != "user"):
        if total <= max_chars and drop == 0 and messages[0]["role"] == "system":
            break  # within the bound, a leading system prompt stays
        total -= len(messages[drop]["content"])
        drop += 1
    return drop
