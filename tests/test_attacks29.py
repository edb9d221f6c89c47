"""attack29: dialogue sessions across both doors."""

from __future__ import annotations

import threading
import types

import pytest

from locod.daemon import sessions
from locod.daemon.conversations import Conversations
from locod.daemon.sessions import DOORS, HTTP, IPC, SessionStore, TurnTrail

TRAIL = TurnTrail("local", (), "chat")


class Clock:
    """The sessions' monotonic clock, moved on by the test: expiry is decided by elapsed time, which a busy
    machine would otherwise stretch past the margins the tests leave."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(sessions, "time", types.SimpleNamespace(monotonic=lambda: self.now))

    def advance(self, seconds: float) -> None:
        self.now += seconds


def answered_turn(store: SessionStore, session: str, owner: str, prompt: str, answer: str) -> None:
    """One turn of ``owner``'s session, answered: entered, opened and recorded as the turn path does."""
    answered = threading.Event()
    store.enter(session, owner, answered)
    store.record(store.open(session, owner, answered), [{"role": "user", "content": prompt}], answer, TRAIL)
    answered.set()


def test_a_turn_that_arrived_before_its_session_expired_is_opened_with_its_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """F1: a turn whose session was alive when it arrived (``enter``) met it emptied at ``open`` when its session
    expired in between (the turn pool picking it up, its attachments read): over HTTP the door had sent it only
    the messages the session did not hold, so the model answered a follow-up without the conversation."""
    clock = Clock(monkeypatch)
    store = SessionStore(idle_s=2, max_sessions=10)
    http, ipc = DOORS[HTTP], DOORS[IPC]
    for owner in (http, ipc):
        answered_turn(store, "S", owner, "My name is Ann.", "Hello Ann.")
    clock.advance(1.2)  # the client's next turn, before the session expires
    conversation = [
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": "Hello Ann."},
        {"role": "user", "content": "What is my name?"},
    ]
    over_http, over_socket = threading.Event(), threading.Event()
    store.enter("S", http, over_http)
    session, sent = Conversations(store, limit=10).continuing(conversation, "S", over_http)
    assert (session, sent) == ("S", conversation[2:])  # the session holds the rest
    store.enter("S", ipc, over_socket)
    clock.advance(1.2)  # its session past session_idle_s since its last answer, not since the turn came
    assert store.open("S", http, over_http).messages == conversation[:2]
    assert store.open("S", ipc, over_socket).messages == conversation[:2]


def test_a_turn_arriving_after_expiry_does_not_revive_the_history(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    store = SessionStore(idle_s=1, max_sessions=10)
    answered_turn(store, "S", "ipc", "My name is Ann.", "Hello Ann.")
    clock.advance(1.2)
    late = threading.Event()
    store.enter("S", "ipc", late)
    assert store.open("S", "ipc", late).messages == []
