"""Attacks on the daemon's storage (attack43): the decision log's files changed under a running daemon, a
file size limit on the daemon, and a log whose table ``decisions`` is gone or a view."""

from __future__ import annotations

import os
import resource
import sqlite3
from pathlib import Path
from typing import Any

import pytest

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
