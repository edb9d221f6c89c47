"""Attacks on the daemon's storage (attack43): the decision log's files changed under a running daemon, a
file size limit on the daemon, and a log whose table ``decisions`` is gone or a view."""

from __future__ import annotations

import os
import resource
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.records import DecisionLog
from locod.daemon.records_schema import MIGRATIONS
from locod.errors import StorageError

from .conftest import DaemonHandle

PRUNE_FIRST = "DELETE FROM decisions WHERE id IN (SELECT id FROM decisions ORDER BY id LIMIT 1)"


def one_turn(handle: DaemonHandle) -> int:
    return handle.client().ask("Say hi.", force="local", max_tokens=2, temperature=0.0, seed=1).decision.decision


def prune_first(db: Path) -> None:
    """docs/operations.md's pruning, one row of it, by another program (the sqlite3 shell's own library)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute(PRUNE_FIRST)
    finally:
        conn.close()


def test_a_shm_file_removed_under_the_daemon_is_said_and_a_restart_keeps_other_writers(daemon_factory: Any) -> None:
    """Attack: delete `locod.db-shm` while the daemon runs ("a stale file"), then prune as docs/operations.md
    says. SQLite keeps the writers' locks in that file: the pruning made a new one, did not see the daemon's,
    and the daemon's next turn overwrote its commit in the WAL; the rows came back, and nothing said so. Now
    the daemon goes on serving and says it (status, its log, once), and after the restart it asks for another
    program's writes are kept."""
    handle = daemon_factory()
    first = one_turn(handle)
    Path(f"{handle.db_path}-shm").unlink()
    prune_first(handle.db_path)
    assert one_turn(handle) == first + 1  # served, its record kept
    warning = handle.client().status()["db_warning"]
    assert warning is not None and f"{handle.db_path}-shm file was removed or replaced" in warning
    assert "restart the daemon" in warning
    one_turn(handle)
    assert handle.log().count("-shm file was removed or replaced") == 1
    handle.stop()
    handle = daemon_factory(name=handle.home.name)
    assert handle.client().status()["db_warning"] is None
    kept = [row["id"] for row in handle.rows()]
    prune_first(handle.db_path)
    one_turn(handle)
    assert [row["id"] for row in handle.rows()][: len(kept) - 1] == kept[1:]


def test_a_file_size_limit_the_log_reaches_is_named(daemon: DaemonHandle) -> None:
    """Attack: a file size limit on the daemon (`ulimit -f` in the shell that started it, systemd's
    LimitFSIZE=). Once the decision log's WAL reached it, every turn was refused with SQLite's "disk I/O
    error", which says neither what nor where. Now the refusal names the file and the limit, and the daemon
    answers everyone else."""
    one_turn(daemon)
    files = [daemon.db_path, Path(f"{daemon.db_path}-wal")]
    limit = max(os.stat(file).st_size for file in files) + (128 << 10)
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    with pytest.raises(StorageError) as refused:
        for _ in range(100):
            one_turn(daemon)
    said = refused.value.message
    assert f"has grown to the daemon's file size limit ({limit} bytes" in said, said
    assert "ulimit -f" in said and "LimitFSIZE=" in said
    assert daemon.client().ping()["pong"]
    assert "file size limit" in daemon.client().status()["db_warning"]


@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE decisions RENAME TO kept; CREATE VIEW decisions AS SELECT * FROM kept",
        "DROP TABLE decisions",
    ],
    ids=["a view in its place", "dropped"],
)
def test_a_log_whose_table_is_gone_is_refused_naming_the_table(tmp_path: Path, change: str) -> None:
    """Attack: replace table ``decisions`` with a view of it (or drop it), ``user_version`` left at this code's.
    The start was refused, rightly, by a line naming each of the table's 49 columns as lacking (1,650
    characters); it now names the table."""
    db_path = tmp_path / "locod.db"
    DecisionLog(db_path).close()
    with closing(sqlite3.connect(db_path)) as conn:
        conn.executescript(change)
    with pytest.raises(StorageError) as refused:
        DecisionLog(db_path)
    said = refused.value.message
    assert f"decision log {db_path} is at schema version {len(MIGRATIONS)} but lacks table decisions: " in said, said
    assert "column" not in said and len(said) < 500


@pytest.mark.parametrize(
    ("version", "view"),
    [(0, "decisions"), (len(MIGRATIONS) - 1, "log_identity")],
    ids=["a new log's decisions", "the last migration's table"],
)
def test_a_view_where_a_migration_makes_a_table_is_refused_by_name(tmp_path: Path, version: int, view: str) -> None:
    """Attack: a view at the name of a table a migration makes (a file another program made, or a log restored
    from a dump one migration behind, its new table a view). The start ended in sqlite_utils' traceback
    ("Table decisions is actually a view", exit 1); it is now refused naming the file and the view, and the
    file is left as it was."""
    db_path = tmp_path / "locod.db"
    if version:
        DecisionLog(db_path).close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.executescript(f"DROP TABLE IF EXISTS {view}; CREATE VIEW {view} AS SELECT 1 AS identity")
        conn.execute(f"PRAGMA user_version = {version}")
    with pytest.raises(StorageError) as refused:
        DecisionLog(db_path)
    said = refused.value.message
    assert said.startswith(f"decision log {db_path} cannot be migrated to schema version {version + 1}: "), said
    assert f"Table {view} is actually a view" in said and "nothing was written to it" in said
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (version,)


def test_a_wal_emptied_under_the_daemon_refuses_turns_and_leaves_the_log_whole(daemon_factory: Any) -> None:
    """Attack: empty `locod.db-wal` in place while the daemon runs (`truncate -s 0` to win back room on a full
    disk). The daemon answered on: each turn's record went past a hole at the file's start, `decisions` then
    failed ("database disk image is malformed"), a kill -9 lost every one of them, and a clean stop's
    checkpoint copied the hole into `locod.db`, which `PRAGMA integrity_check` then found malformed, the turns
    checkpointed before it included. Now the next turn is refused by name (`db_replaced`), nothing more is
    written, and a stop leaves `locod.db` whole, as the last checkpoint left it."""
    handle = daemon_factory()
    kept = one_turn(handle)
    handle.stop()  # a clean stop checkpoints the turn into locod.db
    handle = daemon_factory(name=handle.home.name)
    one_turn(handle)
    wal = Path(f"{handle.db_path}-wal")
    os.truncate(wal, 0)
    with pytest.raises(StorageError) as refused:
        for _ in range(3):
            one_turn(handle)
    assert refused.value.code == "db_replaced"
    assert f"its -wal file {wal} was emptied or overwritten while the daemon ran" in refused.value.message
    client = handle.client()
    assert "was emptied or overwritten" in client.status()["db_warning"]
    with pytest.raises(StorageError, match="was emptied or overwritten"):
        one_turn(handle)
    assert client.ping()["pong"]
    assert handle.stop() == 0
    with closing(sqlite3.connect(handle.db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT id, outcome FROM decisions").fetchall() == [(kept, "ok")]
    handle = daemon_factory(name=handle.home.name)
    assert one_turn(handle) == kept + 1
