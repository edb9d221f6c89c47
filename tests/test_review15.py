"""Review 15: the daemon's middle, read for the next reader; the bugs that reading found."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.tallies import local_midnight

from .conftest import free_port
from .test_attacks12 import grow, one_turn, read_bytes, restart
from .test_http import samples


def _turn(log: DecisionLog, location: str = "cloud") -> int:
    return log.begin(DecisionRecord("s", 0, "r", "0" * 64, 2, None, "chat", location, "m", "test"))


def test_a_turn_begun_before_midnight_and_paid_after_counts_today_after_a_restart_too(tmp_path: Path) -> None:
    """Review: today's tally counted a turn's cost when it finished (money is spent as it answers), but read
    it back from the log by when the turn began. A cloud turn begun before midnight and answered after it
    counted towards today's daily cap until a restart, then vanished from it: status's spend and the cap's
    shield changed with a restart. Now both count by when the turn finished."""
    path = tmp_path / "locod.db"
    log = DecisionLog(path)
    assert log.spent_today() == 0.0  # today's tally read: from now on kept in memory
    decision = _turn(log)
    with closing(sqlite3.connect(path)) as conn, conn:  # begun a minute before local midnight
        conn.execute("UPDATE decisions SET created = ? WHERE id = ?", [local_midnight() - 60, decision])
    log.finish(decision, Outcome("ok", "cloud", "m", cost_usd=0.5))
    running = log.spent_today(), log.answered_today()
    log.close()

    again = DecisionLog(path)  # a restart reads today's tally from the log
    try:
        assert running == (0.5, {"turns": 1, "cloud": 1})
        assert (again.spent_today(), again.answered_today()) == running
    finally:
        again.close()


def test_metrics_sums_count_a_judges_cost_once_whether_kept_or_read_after_a_restart(tmp_path: Path) -> None:
    """The finished turns' sums (/metrics) are read in one pass and kept; a judge's cost added to a kept turn
    is counted in them once, and a restart, which reads the log afresh, says the same."""
    path = tmp_path / "locod.db"
    log = DecisionLog(path)
    first = _turn(log)
    log.finish(first, Outcome("ok", "cloud", "m", tokens_in=3, cost_usd=0.25, latency_first_token_ms=80.0))
    running = _turn(log, "local")  # still running: the sums keep the turns before it
    log.finished.read()  # a scrape: the first turn is kept in the sums from now on
    log.add_cost(first, 0.125)
    log.finish(running, Outcome("ok", "local", "m", tokens_in=5, latency_first_token_ms=400.0))
    live = log.finished.read()
    log.close()

    again = DecisionLog(path)
    try:
        reread = again.finished.read()
    finally:
        again.close()
    for sums in (live, reread):
        totals = {(row["location"], row["outcome"]): row for row in sums.totals()}
        assert totals["cloud", "ok"]["cost_usd"] == 0.375 and totals["cloud", "ok"]["turns"] == 1
        assert totals["local", "ok"]["tokens_in"] == 5
        counts, count, total_ms = sums.histogram("latency_first_token_ms")
        assert count == 2 and total_ms == 480.0 and counts[:3] == [0, 1, 1]  # under 50, 100, 250 ms


def test_the_first_scrape_after_a_start_reads_the_log_once(daemon_factory: Any) -> None:
    """Review: the first /metrics after a start summed the whole log three times, once for the turn totals
    and once for each latency histogram (on a year of turns, three gigabytes read while status waited). Now
    one pass sums them all, and what it says is still what the log holds."""
    port = free_port()
    config = {"http": {"listen": f"127.0.0.1:{port}"}}
    handle = daemon_factory(config)
    one_turn(handle)
    handle.stop()
    grow(handle.db_path, 10_000)
    size = handle.db_path.stat().st_size
    handle = restart(daemon_factory, handle, config)  # migrated, as a log of an older version would be
    handle = restart(daemon_factory, handle, config)
    before = read_bytes(handle.proc.pid)
    metrics = samples(f"http://127.0.0.1:{port}")
    assert read_bytes(handle.proc.pid) - before < 1.5 * size
    (truth,) = handle.rows("SELECT COUNT(*) AS n, COUNT(latency_first_token_ms) AS timed FROM decisions")
    assert metrics[("locod_decision_seconds_count", ())] == truth["n"]
    first_token = [v for (name, _), v in metrics.items() if name == "locod_first_token_seconds_count"]
    assert sum(first_token) == truth["timed"]  # one histogram per place the turns ran
