"""Review 15: the daemon's middle, read for the next reader; the bugs that reading found."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.tallies import local_midnight


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
