"""Round twelve of attacks on a running daemon: a year of use, and the people who inspect the decision log. A
log of a year holds hundreds of thousands of turns, and its readers (a sqlite3 shell, a notebook, a dump and
reload) do what SQLite lets them; each test is one way in that broke or could, and now holds. Real daemon,
real SQLite files; a year is grown from a row the daemon wrote, in SQL, as the daemon writes it."""

from __future__ import annotations

import signal
import sqlite3
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.history import read_history
from locod.daemon.records import MIGRATIONS, WAL_KEPT_BYTES, WAL_WARN_BYTES, labelled_turns
from locod.errors import StorageError
from locod.policy.train import data_hash

from .conftest import DaemonHandle, free_port, wait_for
from .test_http import samples

YEAR_S = 365 * 86400.0
LOCAL = "smollm2-135m-instruct"


def grow(db_path: Path, turns: int, pending: int = 0) -> None:
    """Make the log hold ``turns`` copies of its newest row spread over the year up to now (every 7th one
    escalated to the cloud at a cost, every 10th labelled, every 14th with a shadow answer), and ``pending``
    more left running by a daemon that died."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(decisions)") if row[1] != "id"]
    made = {
        "created": ":now - :year * (:n - k) / :n",
        "finished": ":now - :year * (:n - k) / :n + 1",
        "session": "'s' || (k / 20)",
        "turn": "k % 20",
        "request_id": "printf('r%016d', k)",
        "outcome": f"CASE WHEN k > :n - {pending} THEN 'pending' WHEN k % 7 = 0 THEN 'escalated' ELSE 'ok' END",
        "backend": "CASE WHEN k % 7 = 0 THEN 'cloud' ELSE 'local' END",
        "cost_usd": "CASE WHEN k % 7 = 0 THEN 0.0004 ELSE 0 END",
        "satisfied": "CASE WHEN k % 10 = 0 THEN k % 3 != 0 END",
        "label_source": "CASE WHEN k % 10 = 0 THEN 'user' END",
        "shadow": 'CASE WHEN k % 14 = 0 THEN \'{"model":"m","satisfied":true,"grader":"overlap"}\' END',
    }
    picked = ", ".join(made.get(c, c) for c in columns)
    conn.execute(
        f"WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM s WHERE k < :n) "
        f"INSERT INTO decisions ({', '.join(columns)}) SELECT {picked} FROM s, "
        "(SELECT * FROM decisions ORDER BY id DESC LIMIT 1)",
        {"n": turns, "now": time.time() - 3600, "year": YEAR_S},
    )
    conn.close()


def read_bytes(pid: int) -> int:
    """Bytes a process has read so far (``rchar``: SQLite reads its pages with pread)."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["rchar"])


def one_turn(handle: DaemonHandle) -> int:
    return handle.client().ask("Say hi.", force="local", max_tokens=4, temperature=0.0, seed=1).decision.decision


def restart(factory: Any, handle: DaemonHandle, config: dict[str, Any]) -> DaemonHandle:
    handle.stop()
    return factory(config, name=handle.home.name)  # type: ignore[no-any-return]


def test_a_year_of_decisions_costs_a_start_and_a_scrape_what_an_empty_log_does(daemon_factory: Any) -> None:
    """Attack: run a daemon on a year of decisions (here 20,000 turns, 40 MB) and scrape /metrics. Each start
    read the whole file twice (marking pending turns interrupted and counting local labels scanned every row:
    2 GB more than an empty log on 500k turns), and each scrape three times (turn totals and two latency
    histograms summed afresh), holding status and `decisions` meanwhile. Now a start reads what it reads on
    an empty log, a scrape after the first reads next to nothing, and what both say is what the log holds."""
    port = free_port()
    config = {"http": {"listen": f"127.0.0.1:{port}"}}
    handle = daemon_factory(config)
    one_turn(handle)
    handle = restart(daemon_factory, handle, config)
    small_start = read_bytes(handle.proc.pid)
    handle.stop()
    grow(handle.db_path, 20_000, pending=3)
    size = handle.db_path.stat().st_size
    handle = restart(daemon_factory, handle, config)  # migrates: indexes made, the year read once
    handle = restart(daemon_factory, handle, config)
    assert read_bytes(handle.proc.pid) - small_start < size / 4
    assert handle.client().status()["interrupted_at_start"] == 0  # the first start after growing marked them
    assert handle.rows("SELECT COUNT(*) AS n FROM decisions WHERE outcome = 'interrupted'")[0]["n"] == 3

    base = f"http://127.0.0.1:{port}"
    samples(base)  # the first scrape sums the year, once
    one_turn(handle)
    before = read_bytes(handle.proc.pid)
    metrics = samples(base)
    assert read_bytes(handle.proc.pid) - before < size / 20
    truth = handle.rows(
        "SELECT COALESCE(backend, location) AS location, outcome, COUNT(*) AS turns, TOTAL(cost_usd) AS usd "
        "FROM decisions WHERE outcome != 'pending' GROUP BY 1, 2"
    )
    for row in truth:
        assert (
            metrics[("locod_turns_total", (("location", row["location"]), ("outcome", row["outcome"])))] == row["turns"]
        )
    assert metrics[("locod_cost_usd_total", (("location", "cloud"),))] == pytest.approx(
        sum(r["usd"] for r in truth if r["location"] == "cloud")
    )
    assert metrics[("locod_decision_seconds_count", ())] == sum(r["turns"] for r in truth)


def test_a_report_of_a_year_and_training_on_it_hold_no_row_of_it(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: `locod report --since 365d` and `locod policy train --from-db` on a year of turns. The report
    held every row of the period in a list (345 MB for 500k turns), training every column of every
    labelled row, prompts included, and hashed the whole file read into memory (1.4 GB in all for a 1 GB
    log). Now the report's rows pass one at a time into its buckets, and training reads only what it
    learns from and hashes the file a megabyte at a time; both still count every turn. `--from-db
    locod.db`, run in the state directory, was refused ("relative path can't be expressed as a file URI")."""
    handle = daemon_factory()
    one_turn(handle)
    handle.stop()
    grow(handle.db_path, 20_000)
    tracemalloc.start()
    try:
        history = read_history(handle.db_path, YEAR_S + 86400)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert history.turns == 20_001
    assert sum(b.cloud for b in history.buckets) == 20_000 // 7
    assert peak < 20_000 * 100  # a row held costs hundreds of bytes; the buckets' latencies, 8 a turn
    monkeypatch.chdir(handle.db_path.parent)
    assert len(labelled_turns(Path(handle.db_path.name))) == 20_000 // 10
    tracemalloc.start()
    try:
        data_hash([handle.db_path])  # the policy's data_sha256: the log read whole took a gigabyte on a year
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < handle.db_path.stat().st_size / 4


def test_a_reader_left_in_a_transaction_is_named_and_the_wal_shrinks_once_it_lets_go(daemon_factory: Any) -> None:
    """Attack: leave a read transaction open on the log (a notebook's `BEGIN; SELECT ...`) while turns are
    written. No checkpoint can pass it, so the WAL grew by every write, unsaid, and once the reader let go
    it kept the size it had grown to. Now the daemon says so in its log and in `locod status`, and once
    the reader lets go the WAL is cut back and the warning goes."""
    handle = daemon_factory()
    one_turn(handle)
    reader = sqlite3.connect(handle.db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM decisions").fetchone()
    writer = sqlite3.connect(handle.db_path, isolation_level=None)  # a year's worth of writes, quickly
    writer.execute("UPDATE decisions SET prompt = ? WHERE id = 1", ["x" * (WAL_WARN_BYTES + (1 << 20))])
    writer.close()
    one_turn(handle)
    warning = handle.client().status()["db_warning"]
    assert warning and "another process holds a read transaction open" in warning
    assert "holds a read transaction open" in handle.log()
    assert "warning: the decision log's WAL" in handle.cli("status").stdout

    reader.execute("COMMIT")
    reader.close()
    one_turn(handle)  # its first write checkpoints, its second starts the WAL over, cut back
    assert handle.client().status()["db_warning"] is None
    assert Path(f"{handle.db_path}-wal").stat().st_size <= WAL_KEPT_BYTES
    assert handle.rows("SELECT COUNT(*) AS n FROM decisions WHERE outcome = 'ok'")[0]["n"] == 3


def test_a_log_rebuilt_with_dump_starts_and_keeps_every_turn(daemon_factory: Any) -> None:
    """Attack: rebuild the log the way SQLite's docs recover a damaged one, `sqlite3 locod.db .dump |
    sqlite3 new.db`, and put it in place. A dump does not carry `PRAGMA user_version`, so the daemon took
    the log for version 0, its first migration failed ("table decisions already exists") and it did not
    start. Now it finds the version from the tables and columns the log has, says so, and goes on."""
    handle = daemon_factory()
    first = one_turn(handle)
    handle.stop()
    old = sqlite3.connect(handle.db_path)
    dump = "\n".join(old.iterdump())
    old.close()
    rebuilt = handle.db_path.with_name("rebuilt.db")
    new = sqlite3.connect(rebuilt)
    new.executescript(dump)
    new.close()
    assert sqlite3.connect(rebuilt).execute("PRAGMA user_version").fetchone()[0] == 0
    rebuilt.replace(handle.db_path)

    handle = restart(daemon_factory, handle, {})
    assert "no schema version (rebuilt with sqlite3's .dump" in handle.log()
    assert f"version {len(MIGRATIONS)}, migrated on" in handle.log()
    assert one_turn(handle) == first + 1
    assert handle.rows("PRAGMA user_version")[0]["user_version"] == len(MIGRATIONS)
    assert handle.client().decisions(of=str(first))[0]["outcome"] == "ok"


def test_a_wal_removed_while_the_daemon_runs_loses_no_turn(daemon_factory: Any) -> None:
    """Attack: delete `locod.db-wal` and `-shm` while the daemon runs ("stale files"). The daemon went on
    writing turns into the removed file, which no other reader saw and a crash would lose. Now it refuses
    turns by name (`db_replaced`: stop it cleanly), and a clean stop writes every turn it held into the
    file."""
    handle = daemon_factory()
    kept = one_turn(handle)
    for suffix in ("-wal", "-shm"):
        Path(f"{handle.db_path}{suffix}").unlink()
    with pytest.raises(StorageError, match="its -wal file was removed") as refused:
        one_turn(handle)
    assert refused.value.code == "db_replaced"
    assert handle.stop(signal.SIGTERM) == 0
    conn = sqlite3.connect(handle.db_path)
    assert conn.execute("SELECT outcome FROM decisions WHERE id = ?", [kept]).fetchone() == ("ok",)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    handle = restart(daemon_factory, handle, {})
    assert one_turn(handle) == kept + 1


def test_old_decisions_pruned_in_batches_while_the_daemon_serves(daemon_factory: Any) -> None:
    """Attack: prune a year of decisions while the daemon runs, as docs/operations.md says. One DELETE of
    most of a year holds the write lock as long as it takes (seconds on a laptop, more on an SD card) and
    turns waiting more than 10 s are refused; the documented way deletes in batches, each a short write.
    Turns are answered meanwhile, and a label for a pruned decision is refused by name."""
    handle = daemon_factory()
    one_turn(handle)
    handle.stop()
    grow(handle.db_path, 5_000)
    handle = restart(daemon_factory, handle, {})
    batch = (
        "DELETE FROM decisions WHERE id IN (SELECT id FROM decisions "
        "WHERE created < strftime('%s', 'now', '-90 days') LIMIT 1000)"
    )
    conn = sqlite3.connect(handle.db_path, isolation_level=None, timeout=10)
    while conn.execute(batch).rowcount:
        one_turn(handle)
    conn.close()
    wait_for(lambda: handle.client().status()["queue"]["in_flight"] == 0, 30, "turns to settle")
    left = handle.rows("SELECT MIN(created) AS oldest, COUNT(*) AS n FROM decisions")[0]
    assert left["oldest"] >= time.time() - 91 * 86400 and 0 < left["n"] < 5_000
    with pytest.raises(Exception, match="no decision with id 2") as refused:
        handle.client().feedback(2, True)
    assert getattr(refused.value, "code", None) == "unknown_decision"


def test_a_long_migration_asks_systemd_for_the_time_it_takes(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: upgrade locod under systemd with a year of decisions on a slow disk. The new migration reads
    the whole log, minutes on an SD card; systemd's start timeout (90 s) killed the daemon midway, the
    migration rolled back, and every restart began it again. Now the daemon says it is migrating, in its
    log and to systemd, with EXTEND_TIMEOUT_USEC for the time it may take, before it is ready."""
    from .test_systemd import NotifyListener, notified_daemon

    handle = daemon_factory()
    one_turn(handle)
    handle.stop()
    grow(handle.db_path, 40_000)
    with sqlite3.connect(handle.db_path) as conn:  # as the locod before migration 11 left it
        partial = conn.execute("SELECT name FROM sqlite_master WHERE sql LIKE '%WHERE%' AND type = 'index'")
        for (index,) in partial.fetchall():
            conn.execute(f"DROP INDEX {index}")
        conn.execute("ALTER TABLE decisions DROP COLUMN s_settled")  # migration 12's (SQLite 3.35)
        conn.execute("DROP TABLE log_identity")  # migration 13's
        conn.execute("PRAGMA user_version = 10")
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        handle = notified_daemon(lambda config, **kw: daemon_factory(config, name=handle.home.name, **kw), notify)
        wait_for(lambda: "READY=1" in notify.fields(), 30, "READY=1")
        keys = notify.keys()
        assert keys.index("EXTEND_TIMEOUT_USEC") < keys.index("READY=1")
        extended = next(f for f in notify.fields() if f.startswith("EXTEND_TIMEOUT_USEC="))
        assert int(extended.split("=")[1]) >= 90_000_000
        assert "migrating the decision log" in handle.log()
    finally:
        notify.close()
    assert handle.rows("PRAGMA user_version")[0]["user_version"] == len(MIGRATIONS)
