"""The decision log held by another process: a `sqlite3` shell left in a write transaction. Turns and
labels are refused with an error that says so, while the serving loop keeps answering everyone else."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.daemon.records import PROMPT_SHOWN, DecisionLog, DecisionRecord, Outcome
from locod.errors import LocodError, StorageError

from .conftest import DaemonHandle, start_daemon, wait_for


def test_a_write_lock_held_by_another_process_is_named_and_stalls_no_one(daemon: DaemonHandle) -> None:
    client = daemon.client()
    first = client.ask("Say hi.", max_tokens=2).done
    assert first is not None
    holder = sqlite3.connect(daemon.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # what `sqlite3 locod.db` then `BEGIN IMMEDIATE;` does
    refused: list[LocodError] = []

    def ask() -> None:
        try:
            daemon.client().ask("Say hello.", max_tokens=2)
        except LocodError as exc:
            refused.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        # status, decisions and ping are answered while the turn's record waits for the lock: the turn is
        # seen in flight (before, status waited behind the write and saw it only once it had failed)
        wait_for(lambda: client.status()["queue"]["in_flight"] == 1, 30, "status during the locked write")
        assert [r["id"] for r in client.decisions(5)] == [first.decision]
        assert client.ping()["pong"]
        with pytest.raises(StorageError) as label:
            client.feedback(first.decision, True)
        assert label.value.code == "db_locked" and "another process holds a write lock" in label.value.message
        asking.join(60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [e.code for e in refused] == ["db_locked"]
    assert str(daemon.db_path) in refused[0].message
    # once it lets go: served and labelled as ever, and nothing was recorded for the refused turn
    assert client.ask("Say hello.", max_tokens=2).done is not None
    assert client.feedback(first.decision, True)["satisfied"] is True
    assert [r["outcome"] for r in daemon.rows()] == ["ok", "ok"]


def test_a_feedback_flood_is_bounded_and_answered(daemon: DaemonHandle) -> None:
    """Labels are written by one thread off the loop; a flood past its queue is answered busy, not queued."""
    client = daemon.client()
    done = client.ask("Say hi.", max_tokens=2).done
    assert done is not None
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    n = 500
    for i in range(n):
        sock.send(
            json.dumps({"v": 1, "id": f"f{i}", "op": "feedback", "decision": done.decision, "satisfied": True}).encode()
        )
    replies: list[dict[str, Any]] = []
    while len(replies) < n:
        assert sock.poll(30_000), f"{len(replies)} of {n} answered"
        replies.append(json.loads(sock.recv()))
    sock.close()
    labelled = [r for r in replies if r["type"] == "result"]
    codes = {r.get("code") for r in replies if r["type"] == "error"}
    assert len(labelled) == 1 and codes <= {"already_labelled", "busy"}
    assert client.ping()["pong"]


def test_labels_queued_behind_a_locked_log_are_answered_without_each_waiting_out_the_lock(
    daemon: DaemonHandle,
) -> None:
    """One label waits for the lock (a bounded time) and is refused; those that queued behind it meanwhile
    are refused at once, so none is answered after its client gave up."""
    client = daemon.client()
    done = client.ask("Say hi.", max_tokens=2).done
    assert done is not None
    holder = sqlite3.connect(daemon.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        for i in range(6):
            label = {"v": 1, "id": f"f{i}", "op": "feedback", "decision": done.decision, "satisfied": True}
            sock.send(json.dumps(label).encode())
        replies = []
        for _ in range(6):
            assert sock.poll(30_000), f"{len(replies)} of 6 answered"
            replies.append(json.loads(sock.recv()))
    finally:
        sock.close()
        holder.execute("ROLLBACK")
        holder.close()
    assert {r["code"] for r in replies} == {"db_locked"}
    assert any("the labels before this one" in r["message"] for r in replies)
    assert client.feedback(done.decision, True)["satisfied"] is True  # once it lets go


def test_the_decisions_op_returns_a_logged_prompts_head_only(tmp_path: Path, models_dir: Path) -> None:
    """With log.prompts a record may hold a prompt of a megabyte: a `decisions` reply of a thousand of them
    was built whole on the serving loop. The op returns each prompt's head; the log keeps it whole."""
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True, mode=0o700)
    log = DecisionLog(state / "locod.db")
    prompt = "tell me " * 50_000
    decision = log.begin(DecisionRecord("s", 0, "r", "0" * 64, len(prompt), prompt, "chat", "local", "m", "test"))
    log.finish(decision, Outcome("error", "local", "m", error="test"))
    log.close()
    handle = start_daemon(tmp_path / "d", models_dir, {"log": {"prompts": True}})
    try:
        (row,) = handle.client().decisions(10)
        assert row["prompt"] == prompt[:PROMPT_SHOWN] and row["prompt_chars"] == len(prompt)
        assert handle.rows()[0]["prompt"] == prompt
    finally:
        handle.stop()
