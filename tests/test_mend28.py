"""Mend 28: four things a review of the last session's change found, each mended and held here on real parts.

A CLI that checked an older daemon's records against its own copy of the log's query now asks the daemon
what it narrows by (its ``ping``); the daily tally's count says what it returns (``Counted``) without a
one-item list; the HTTP door's named session waits for its turn as the socket's does, on the event of the
turn just ahead, not by polling; and a start after a clean stop no longer reads the log for turns to settle.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from locod.client import Client
from locod.daemon.cloud import CloudBackend
from locod.daemon.config import EMBEDDED_MODEL, load_config
from locod.daemon.decision import Decision, Routing
from locod.daemon.learner import Learner
from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.tallies import Counted, local_midnight
from locod.errors import ProtocolError
from locod.policy.messplus import RecordedFeatures, TurnFeatures

from .conftest import DaemonHandle, cloud_config, locod_command, start_daemon, wait_for, write_config
from .faultproxy import Fault, FaultProxy
from .test_attacks26 import held_open, post, sent_to_cloud, turns_of
from .test_daemon import previous_release
from .test_http import http_daemon

FEATURES = RecordedFeatures.of(TurnFeatures(prompt="Hi", task="chat"))


def test_the_ping_lists_the_decisions_fields_the_daemon_narrows_by(daemon: DaemonHandle) -> None:
    client = daemon.client()
    client.ask("Hi", session="a", max_tokens=2)
    assert client.ping()["decisions_narrowing"] == ["session", "location", "outcome", "since", "before"]
    assert [row["session"] for row in client.decisions(session="a")] == ["a"]
    narrowed = daemon.cli("decisions", "--session", "nobody")
    assert narrowed.returncode == 0 and "no decision record matches" in narrowed.stderr


def test_a_narrowed_query_to_a_daemon_older_than_the_narrowing_is_refused_with_what_to_do(
    tmp_path: Path, models_dir: Path
) -> None:
    """A daemon from before the narrowing (upgraded, not restarted) ignores ``session`` and answers the newest
    records: the CLI kept the matches among them, by its own copy of the log's query, and missed every older
    one. Now the client asks the daemon's ``ping`` what it narrows by, and refuses the query naming the
    daemon's version and what to do; an unnarrowed one is still answered."""
    handle = start_daemon(tmp_path / "d", models_dir, extra_env={"PYTHONPATH": str(previous_release(tmp_path))})
    try:
        with Client(handle.endpoint) as client:
            client.ask("Say hi.", max_tokens=2, session="old")
            assert "decisions_narrowing" not in client.ping()  # the older daemon indeed
            with pytest.raises(ProtocolError, match="restart it") as refused:
                client.decisions(session="old")
            assert refused.value.code == "daemon_outdated" and "(locod 0.1.0, pid " in refused.value.message
            assert len(client.decisions()) == 1
        this_cli = {k: v for k, v in handle.env.items() if k != "PYTHONPATH"}  # the upgraded command, not the daemon's

        def decisions(*args: str) -> subprocess.CompletedProcess[str]:
            command = locod_command("--config", str(handle.config_path), "decisions", *args)
            return subprocess.run(command, env=this_cli, capture_output=True, text=True, timeout=120)

        narrowed = decisions("--session", "old", "--outcome", "ok")
        assert narrowed.returncode == 1, narrowed
        assert "does not narrow decision records by session, outcome" in narrowed.stderr, narrowed.stderr
        assert "restart it" in narrowed.stderr and narrowed.stdout == ""  # no table of unfiltered records
        assert decisions().returncode == 0
    finally:
        handle.stop()


def test_a_hold_says_what_it_counted_in_which_days_tally(tmp_path: Path) -> None:
    """``DailyTally.count`` returned a ``Held`` that was really what it had counted, net of the count it
    replaced, and ``counting`` carried it out in a one-item list. A hold now keeps the ``Counted`` its count
    returned: the money, and the day's tally it went to (None before any tally was read: the log's read
    counts the row)."""
    log = DecisionLog(tmp_path / "locod.db")
    try:
        first = answered(log, 0)
        unread = log.hold_cost(first, 0.05)
        assert unread.counted == Counted(0.05, None) and unread.error is None
        assert log.spent_today() == pytest.approx(0.05)  # read from the log, which has the hold in the row
        log.add_cost(first, 0.01, unread)  # the row and the read's count lose the hold: the call cost 0.01
        assert log.spent_today() == pytest.approx(0.01)
        second = answered(log, 1)
        held = log.hold_cost(second, 0.02)
        assert held.counted == Counted(0.02, local_midnight())
        log.add_cost(second, 0.005, held)
        assert log.spent_today() == pytest.approx(0.015)
    finally:
        log.close()


def test_named_http_requests_queued_behind_a_long_turn_answer_in_order_and_one_that_leaves_gives_up_its_place(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """The HTTP door's requests of a named session wait for their turn as the socket's do, asleep on the answer
    of the turn just ahead (they polled the session's queue every 50 ms): three queue behind a turn the cloud
    holds; the middle one's client hangs up, the others answer in order, each seeing the answers before it."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=300.0))
    held = Fault(kind="hold", times=1)
    proxy.set(held)
    first = held_open(base, [{"role": "user", "content": "Remember the word PLUM."}], "chat")
    wait_for(lambda: proxy.seen, 120, "the first request at the cloud")

    def waiting(count: int) -> None:
        wait_for(lambda: handle.client().status()["queue"]["waiting_for_session"] == count, 120, f"{count} to wait")

    with ThreadPoolExecutor(2) as pool:
        second = pool.submit(post, base, [{"role": "user", "content": "Which word?"}], "chat")
        waiting(1)
        gone = held_open(base, [{"role": "user", "content": "Never mind."}], "chat")
        waiting(2)
        third = pool.submit(post, base, [{"role": "user", "content": "Say it again."}], "chat")
        waiting(3)
        gone.close()
        waiting(2)  # its place given up while the turn ahead of it still runs
        held.released.set()
        response = first.getresponse()
        opening = json.loads(response.read())["choices"][0]["message"]["content"]
        assert response.status == 200
        (status, answer), (third_status, _) = second.result(), third.result()
    assert status == 200 and third_status == 200, (answer, third.result())
    said = answer["choices"][0]["message"]["content"]
    assert sent_to_cloud(proxy) == [
        ("user", "Remember the word PLUM."),
        ("assistant", opening),
        ("user", "Which word?"),
        ("assistant", said),
        ("user", "Say it again."),
    ]
    assert turns_of(handle, "chat") == [(0, "ok"), (1, "ok"), (2, "ok")]


def test_a_stop_with_http_requests_queued_for_their_session_ends(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A request waiting for its session's turn waits on a thread of the HTTP door's: a stop while the turn
    ahead is held at the cloud cancels that turn after the grace, the waiting request is refused as the
    daemon is stopping, and the daemon exits (no thread of the door's left waiting keeps it alive)."""
    config = {**cloud_config(proxy.base_url, timeout_s=300.0), "daemon": {"shutdown_grace_s": 1.0}}
    handle, base = http_daemon(daemon_factory, config)
    held = Fault(kind="hold", times=1)
    proxy.set(held)
    try:
        first = held_open(base, [{"role": "user", "content": "Remember the word PLUM."}], "chat")
        wait_for(lambda: proxy.seen, 120, "the first request at the cloud")
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(post, base, [{"role": "user", "content": "Which word?"}], "chat")
            wait_for(lambda: handle.client().status()["queue"]["waiting_for_session"] == 1, 120, "the second to wait")
            assert handle.stop() == 0, handle.log()
            status, body = second.result()
        assert status == 503 and body["error"]["code"] == "shutting_down", body
        first.close()
        assert turns_of(handle, "chat") == [(0, "cancelled")]
    finally:
        held.released.set()


def test_a_start_after_a_clean_stop_reads_no_turns_to_settle_and_one_after_a_kill_settles_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start read the answered turns from the oldest the MESS+ state knew it settled on (up to 11,000
    rows) for those it never settled. A clean stop now saves the state with the log's newest id, every
    turn up to it settled; a start whose log is still there reads nothing. After a kill (commits, then no
    save: the state older than the log), or a stop with a turn whose settling never came, the next start
    reads the log and settles each missed turn once. The real Learner over a real decision log."""
    loaded = load_config(write_config(tmp_path / "config.toml", {"paths": {"state_dir": str(tmp_path / "state")}}))
    records = DecisionLog(tmp_path / "state" / "locod.db")
    reads: list[int] = []
    read_settled = records.settled_since

    def settled_since(first: int) -> list[tuple[int, str, float]]:
        reads.append(first)
        return read_settled(first)

    monkeypatch.setattr(records, "settled_since", settled_since)

    def start() -> Learner:
        reads.clear()
        return Learner(loaded, records, CloudBackend(loaded.cloud, loaded.source))

    try:
        running = start()
        one, _, three = (routed(records, running) for _ in range(3))
        for decision_id, decision in (one, three):  # the second's settling is still to come at the kill
            running.settle(decision_id, decision, "Hi", "Hello")
        four = routed(records, running)  # committed, then killed: no settling, no save
        assert running.mess.state.settled == 2

        after_kill = start()
        assert reads == [one[0]]  # from the oldest turn the saved state settled
        assert after_kill.mess.state.settled == 4 and set(after_kill.mess.state.settled_ids) == {1, 2, 3, 4}
        after_kill.close()  # a clean stop: every turn the log answered is settled

        clean = start()
        assert reads == [] and clean.mess.state.settled == 4  # the log was not read
        five = routed(records, clean)  # committed, then killed again: the state says the stop's newest, 4
        assert four[0] == 4 and five[0] == 5

        after_second_kill = start()
        assert reads == [one[0]] and after_second_kill.mess.state.settled == 5
        routed(records, after_second_kill)  # answered, its settling never comes (a bug between the two)
        after_second_kill.close()

        after_lost_settling = start()
        assert reads == [one[0]] and after_lost_settling.mess.state.settled == 6
        after_lost_settling.close()
        assert start().mess.state.settled == 6 and reads == []
    finally:
        records.close()


def routed(records: DecisionLog, learner: Learner) -> tuple[int, Decision]:
    """A turn the rule routed to the local model, recorded and answered as the daemon does it, up to the
    learner's settling, which is the caller's."""
    routing = Routing(EMBEDDED_MODEL.name, FEATURES, 0.0, 0.8, 20.0, {EMBEDDED_MODEL.name: 0.6}, {}, {}, {}, None)
    decision = Decision("local", EMBEDDED_MODEL.name, (), "routed", routing=routing)
    record = DecisionRecord(
        "s", 0, "r", "0" * 64, 2, None, "chat", "local", EMBEDDED_MODEL.name, "routed", routing=routing
    )
    decision_id = records.begin(record)
    learner.will_settle(decision_id, decision)
    records.finish(decision_id, Outcome("ok", "local", EMBEDDED_MODEL.name, s_settled=routing.s_hat_taken))
    return decision_id, decision


def answered(log: DecisionLog, turn: int) -> int:
    """A cloud turn of session ``s``, recorded and answered at no cost: the judge's hold is for such a turn."""
    decision = log.begin(DecisionRecord("s", turn, f"r{turn}", "0" * 64, 2, None, "chat", "cloud", "m", "test"))
    log.finish(decision, Outcome("ok", "cloud", "m"))
    return decision
