"""Small pieces with exact behaviour: the fair gate, session expiry and a turn's price estimate (the
decision's pure logic, context fitting included, is in test_rule.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from pathlib import Path

import pytest

from locod.daemon.config import Config
from locod.daemon.gate import FairGate
from locod.daemon.sessions import Session, SessionStore, TurnTrail, door_of
from locod.daemon.turn import Turn
from locod.protocol import ChatRequest

from .conftest import wait_for


def queue_behind_a_holder(
    gate: FairGate, holder: Hashable, queued: list[tuple[Hashable, str]]
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Hold ``gate`` for ``holder`` and queue each (client, label) turn behind it, in this order, each once
    the one before has been told its place; let go once the places have settled. Returns the order the
    turns were served in, the place each was told when it queued, and where they had settled."""
    order: list[str] = []
    told: dict[str, list[int]] = {}
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.slot(holder):
            holding.set()
            release.wait(10)

    def turn(client: Hashable, label: str) -> None:
        with gate.slot(client, on_wait=lambda ahead: told.setdefault(label, []).append(ahead)) as granted:
            assert granted
            order.append(label)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    holding.wait(5)
    for client, label in queued:
        threads.append(threading.Thread(target=turn, args=(client, label)))
        threads[-1].start()
        wait_for(lambda label=label: label in told, 5, f"{label} to be told")
    everyone = list(range(1, len(queued) + 1))  # behind the holder, one place each
    wait_for(lambda: sorted(places[-1] for places in told.values()) == everyone, 5, "the places to settle")
    first, settled = {k: v[0] for k, v in told.items()}, {k: v[-1] for k, v in told.items()}
    release.set()
    for t in threads:
        t.join(5)
    return order, first, settled


def test_fair_gate_serves_clients_round_robin() -> None:
    """Client A queues three turns before B and C queue one each: A's second waits for B's and C's first."""
    queued = [("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1"), ("C", "c1")]
    order, _, _ = queue_behind_a_holder(FairGate(), "holder", queued)
    assert order == ["a1", "b1", "c1", "a2", "a3"]


def test_a_waiting_turn_is_told_how_many_go_first_as_the_queue_moves() -> None:
    queued = [("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1"), ("C", "c1")]
    _, first, settled = queue_behind_a_holder(FairGate(), "holder", queued)
    # round-robin, as served: a1, b1, c1, a2, a3 behind the holder; a2 was told 2 when it queued, then 4
    assert settled == {"a1": 1, "b1": 2, "c1": 3, "a2": 4, "a3": 5}
    assert first["a2"] == 2


def test_many_connections_through_one_door_get_that_doors_share_of_the_gate() -> None:
    """Round-robin per connection gave a local user with four tcp connections four turns for each one of
    the owner's ipc socket. Grouped by door, the doors take turns, then the door's clients; every waiting
    turn is told the place it is then served in."""
    queued = [(b"t1", "t1a"), (b"t2", "t2a"), (b"t3", "t3a"), (b"t4", "t4a"), (b"iowner", "o1"), (b"iowner", "o2")]
    order, _, settled = queue_behind_a_holder(FairGate(group=door_of), b"ioperator", queued)
    served = ["t1a", "o1", "t2a", "o2", "t3a", "t4a"]
    assert order == served
    assert settled == {label: served.index(label) + 1 for label in served}


def test_fair_gate_gives_up_when_cancelled() -> None:
    gate = FairGate()
    cancelled = threading.Event()
    results: list[bool] = []
    with gate.slot("first"):
        t = threading.Thread(target=lambda: results.append(gate.slot("second", cancelled).__enter__()))
        t.start()
        wait_for(lambda: gate.waiting == 1, 5, "the second turn to wait")  # not a 0.05 s sleep: too short under load
        cancelled.set()
        t.join(5)
    assert results == [False] and gate.waiting == 0


def test_sessions_keep_history_and_expire() -> None:
    store = SessionStore(idle_s=0.2, max_sessions=2)
    session = store.open("s", "ipc")
    store.record(session, [{"role": "user", "content": "hi"}], "hello", TurnTrail("local", (), "chat"))
    assert store.open("s", "ipc").messages[-1] == {"role": "assistant", "content": "hello"}
    assert store.open("s", "ipc").turns == 1
    time.sleep(0.3)
    assert store.open("s", "ipc").turns == 0  # expired, opened afresh
    store.open("t", "ipc")
    store.open("u", "ipc")  # over max_sessions: the least recently used goes
    assert len(store) == 2


def test_sessionless_turns_take_no_slot_and_eviction_is_fair_per_door() -> None:
    store = SessionStore(idle_s=600, max_sessions=10)
    victim = store.open("victim-dialogue", owner="ipc")
    store.record(victim, [{"role": "user", "content": "remember 42"}], "ok", TurnTrail("local", (), "chat"))
    for _ in range(1100):  # one-off turns without a session id
        store.open(None, owner="http")
    assert len(store) == 1
    for i in range(1100):  # one-off turns, each naming a fresh session (each from a connection of its own)
        store.open(f"flood-{i}", owner="http")
    assert len(store) == 10
    assert store.open("victim-dialogue", owner="ipc").messages[0]["content"] == "remember 42"
    # the same id at another door is another dialogue: neither read nor continued from there
    assert store.open("victim-dialogue", owner="http").messages == []
    assert store.held("victim-dialogue", "tcp") == (0, []) and store.held("victim-dialogue", "ipc")[1]
    assert store.open("victim-dialogue", owner="http").key != victim.key  # nor its KV state


def test_labels_need_a_turn_that_answered(tmp_path: Path) -> None:
    """A label grades an answer: a turn still running, failed or cut off by a stop has none to grade."""
    from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
    from locod.errors import UnknownDecision

    log = DecisionLog(tmp_path / "locod.db")

    def record() -> int:
        return log.begin(DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", "local", "m", "test"))

    running, failed, stopped = record(), record(), record()
    log.finish(failed, Outcome("error", "local", "m", error="internal error: RuntimeError"))
    with pytest.raises(UnknownDecision, match="still running") as info:
        log.label(running, True, "user")
    assert info.value.code == "not_finished"
    with pytest.raises(UnknownDecision, match="ended without an answer") as info:
        log.label(failed, True, "user")
    assert info.value.code == "not_answered"
    log.close()
    log = DecisionLog(tmp_path / "locod.db")  # the next start marks the running ones interrupted
    with pytest.raises(UnknownDecision, match=r"ended without an answer \(interrupted\)"):
        log.label(stopped, False, "user")
    log.finish(record(), Outcome("ok", "local", "m"))
    assert log.label(4, True, "user").decision_id == 4
    log.close()


def test_a_turn_is_priced_with_the_history_its_client_sent() -> None:
    """A client's own history (an HTTP client's new conversation, a socket's ``messages``) goes to the cloud
    with the question, so the decision's price estimate, and the daily cap's shield, count it."""
    history = [{"role": "user", "content": "x" * 4000}, {"role": "assistant", "content": "y" * 4000}]
    question = {"role": "user", "content": "and then?"}
    session = Session("s", owner="http")
    session.dialogue = (({"role": "user", "content": "z" * 400},), (False,))

    def sent(messages: list[dict[str, str]]) -> int:
        return Turn(ChatRequest("r", messages), session, b"h1", "chat", [], Config()).text_bytes

    assert sent([*history, question]) == sent([question]) + 8000  # 8,000 ASCII characters
    assert sent([question]) == 400 + 9  # the session's history and the question
