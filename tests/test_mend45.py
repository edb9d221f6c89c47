"""Mend 45: the decision log's per-write checks made cheaper and a backup restored with ``cp`` over a running
daemon's log caught; a table changed under the daemon named; a failed grading logged; the turn runner's
recorder thread ended at stop."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from collections import Counter
from concurrent.futures import Future
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from locod.daemon.config import load_config
from locod.daemon.learner import MAX_JUDGING
from locod.daemon.records import DecisionLog
from locod.daemon.reply import Reply
from locod.daemon.server import Daemon
from locod.errors import StorageError
from locod.protocol import ChatOptions, ChatRequest, DoneFrame, Frame

from .conftest import DaemonHandle, write_config
from .test_attack43 import one_turn
from .test_mend31 import learner
from .test_routing import auto_config

DEAD_URL = "http://127.0.0.1:1/v1"  # nothing listens on port 1: every connection is refused at once
ARCHIVE_TRIGGER = "CREATE TRIGGER archive BEFORE INSERT ON decisions BEGIN SELECT RAISE(ABORT, 'read-only'); END"


def grow_and_checkpoint(db: Path) -> None:
    """Another program's legitimate writes: a table of its own grown by many pages, then checkpointed into
    ``locod.db`` (docs/operations.md: "Add columns or tables of your own")."""
    with closing(sqlite3.connect(db, isolation_level=None, timeout=10)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (text TEXT)")
        conn.executemany("INSERT INTO notes VALUES (?)", [("n" * 2000,)] * 200)
        assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0


def test_a_backup_restored_with_cp_over_a_running_daemons_log_is_refused_and_kept_whole(daemon_factory: Any) -> None:
    """Attack: restore an older backup with `cp backup.db locod.db` while the daemon runs. cp writes the
    file in place (same inode), which no identity check sees, and SQLite in WAL mode does not look at the
    file again: its cache and WAL still held the newer pages, and the stop's checkpoint wrote them over the
    backup's, leaving `locod.db` malformed. Now the next turn is refused by name (`db_replaced`), the daemon
    serves on, and the stop leaves the backup whole. Another program's writes and checkpoints, and a
    `touch`, are not taken for it."""
    handle = daemon_factory()
    kept = one_turn(handle)
    handle.stop()  # a clean stop checkpoints the turn into locod.db
    backup = handle.db_path.with_name("backup.db")
    shutil.copy(handle.db_path, backup)
    handle = daemon_factory(name=handle.home.name)
    one_turn(handle)
    grow_and_checkpoint(handle.db_path)
    os.utime(handle.db_path)  # `touch`: the time changes, the file does not
    after_checkpoint = one_turn(handle)
    assert handle.client().status()["db_warning"] is None
    shutil.copyfile(backup, handle.db_path)  # in place, as cp writes it
    with pytest.raises(StorageError) as refused:
        one_turn(handle)
    assert refused.value.code == "db_replaced"
    said = "the file was overwritten in place while the daemon ran (a backup restored with cp?)"
    assert said in refused.value.message
    client = handle.client()
    assert "overwritten in place" in client.status()["db_warning"]
    assert client.ping()["pong"]
    assert handle.stop() == 0
    with closing(sqlite3.connect(handle.db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT id FROM decisions").fetchall() == [(kept,)]
    handle = daemon_factory(name=handle.home.name)
    assert one_turn(handle) == kept + 1
    assert after_checkpoint > kept + 1  # the turns after the backup were numbered past it, and are gone with it


def test_a_trigger_or_a_not_null_column_added_under_the_daemon_is_named(daemon: DaemonHandle) -> None:
    """Attack: another program adds a trigger that aborts inserts into `decisions` (an "archive" guard), or
    rebuilds the table with a column NOT NULL and no default. Every turn was refused with SQLite's own words
    ("read-only", "NOT NULL constraint failed: decisions.tenant"), which named neither. Now the refusal says
    the table was changed under the daemon and what was added (`db_changed`), and once it is undone the
    daemon records turns again, with no restart."""
    one_turn(daemon)
    with closing(sqlite3.connect(daemon.db_path, isolation_level=None, timeout=10)) as conn:
        conn.execute(ARCHIVE_TRIGGER)
        with pytest.raises(StorageError) as refused:
            one_turn(daemon)
        assert refused.value.code == "db_changed"
        assert "table decisions was changed under the daemon" in refused.value.message
        assert "trigger archive (SQLite: read-only)" in refused.value.message
        conn.execute("DROP TRIGGER archive")
        one_turn(daemon)
        table = sqlite_utils.Database(conn)["decisions"]
        table.add_column("tenant", str)  # type: ignore[union-attr]
        conn.execute("UPDATE decisions SET tenant = 'home'")
        table.transform(not_null={"tenant"})  # type: ignore[union-attr]
        with pytest.raises(StorageError) as refused:
            one_turn(daemon)
        assert refused.value.code == "db_changed"
        assert "column tenant NOT NULL without a default" in refused.value.message
    assert "column tenant NOT NULL without a default" in daemon.client().status()["db_warning"]


def open_files() -> dict[str, str]:
    """This process's descriptors and what each is open on (listdir's own one gone by its readlink)."""
    files = {}
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            files[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return files


def test_the_logs_descriptors_are_closed_with_it(tmp_path: Path) -> None:
    """The log keeps descriptors on its files from its first write on, read at each write instead of opening
    the -wal file twice a write; closing the log closes them, and they look at the files the writes made."""
    before = open_files()
    records = DecisionLog(tmp_path / "locod.db")
    opened = Counter(open_files()[fd] for fd in open_files().keys() - before.keys())
    assert opened[f"{tmp_path}/locod.db-wal"] == opened[f"{tmp_path}/locod.db-shm"] == 2  # SQLite's and the log's
    records.close()
    assert open_files() == before


def test_a_grading_that_raises_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A grading that raised what ``_grade`` does not catch vanished in its Future, which nobody reads: no
    line in the log, and the judge's labels stopped for no reason anyone could find. Now the grading's end
    logs it with the decision's id, and its place in the queue is freed. No real input was found that makes
    ``_grade`` raise (its cloud, storage and unknown-decision failures are caught and said), so the callback
    is given a Future that failed."""
    records = DecisionLog(tmp_path / "state" / "locod.db")
    grading: Future[None] = Future()
    grading.set_exception(KeyError("a bug"))
    try:
        judge = learner(tmp_path / "state", records)
        assert judge._judging.acquire(blocking=False)
        with caplog.at_level(logging.ERROR, logger="locod.daemon.learner"):
            judge._graded(7, grading)
        said = [r for r in caplog.records if r.name == "locod.daemon.learner"]
        assert [r.getMessage() for r in said] == ["judge's grading of decision 7 failed"]
        assert said[0].exc_info is not None and said[0].exc_info[0] is KeyError
        assert all(judge._judging.acquire(blocking=False) for _ in range(MAX_JUDGING))  # its place freed
        judge.close()
    finally:
        records.close()


def test_a_stopped_daemon_leaves_no_thread_of_its_pools(tmp_path: Path, models_dir: Path) -> None:
    """The turn runner's recorder (which commits a local turn's record while the turn reads its prompt) was
    never shut down: its thread outlived the daemon that made it, one per daemon built in a process (the
    tests', an embedding program's). Now each of the daemon's pools ends at its close."""
    config_path = write_config(tmp_path / "config.toml", auto_config(DEAD_URL, sla=0.05))  # local answers
    dirs = {"STATE": tmp_path / "state", "RUNTIME": tmp_path / "run", "MODELS": models_dir}
    daemon = Daemon(load_config(config_path, env={f"LOCOD_{k}_DIR": str(v) for k, v in dirs.items()}))
    frames: list[Frame] = []
    try:
        request = ChatRequest("r", [{"role": "user", "content": "Hi"}], options=ChatOptions(max_tokens=2))
        daemon.runner.run(request, b"client", Reply(frames.append))
        assert isinstance(frames[-1], DoneFrame) and frames[-1].location == "local", frames
        assert any(t.name.startswith("record_") for t in threading.enumerate())
    finally:
        daemon.close()
    prefixes = ("record_", "turn_", "feedback_", "judge_")
    assert [t.name for t in threading.enumerate() if t.name.startswith(prefixes)] == []
