"""Review 16: this session's change read as its maintainer; the bugs that reading found."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.tallies import Today


def _turn(log: DecisionLog, location: str = "cloud") -> int:
    return log.begin(DecisionRecord("s", 0, "r", "0" * 64, 2, None, "chat", location, "m", "test"))


def test_a_turn_paid_as_another_reads_the_new_days_tally_is_counted_once(tmp_path: Path) -> None:
    """Review: a turn's completion was committed, then counted into today's tally. At midnight the next turn's
    decision reads the new day's tally from the log; read between that commit and that count, it found the
    turn in the log and the count added it again: today's spend and answers said it twice, until a restart.
    Now the read waits for a write of money under way until it is counted."""
    log = DecisionLog(tmp_path / "locod.db")
    try:
        assert log.spent_today() == 0.0  # today's tally read: from now on kept in memory
        decision = _turn(log)
        tally, count = log.today, log.today.count
        read: list[Today] = []
        decision_read = threading.Thread(target=lambda: read.append(tally.read()))  # the next turn's decision

        def midnight_between_commit_and_count(usd: float, answered_by: str | None = None) -> None:
            tally._today.end = time.time()  # the day ends: the next read is the log's
            decision_read.start()
            decision_read.join(timeout=3)  # it reads the log meanwhile, or waits for this count
            count(usd, answered_by)

        tally.count = midnight_between_commit_and_count
        log.finish(decision, Outcome("ok", "cloud", "m", cost_usd=0.5))
        decision_read.join()
        assert [(r.usd, r.turns, r.cloud) for r in read] == [(0.5, 1, 1)]
        assert (log.spent_today(), log.answered_today()) == (0.5, {"turns": 1, "cloud": 1})
    finally:
        log.close()
