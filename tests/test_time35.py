"""Time as an input: time zones, DST days of 23 and 25 hours, and a cloud server whose clock is not this
machine's (a Jetson without an RTC boots in 1970 or 2000 and runs so until NTP sets it). Each test is one
way in that broke, and now holds."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from locod.daemon.history import parse_since, read_history
from locod.daemon.records import DecisionLog, DecisionRecord, Outcome

DAY = 86400.0


@pytest.fixture
def zone() -> Iterator[Callable[[str], None]]:
    """Sets this process's time zone (TZ, then tzset: the system's zone data), put back after the test."""
    before = os.environ.get("TZ")

    def set_zone(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield set_zone
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def local(year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    """The Unix time of a local wall-clock time, in the zone set now."""
    return time.mktime((year, month, day, hour, minute, 0, 0, 0, -1))


def write_turns(db: Path, times: list[float]) -> None:
    """Cloud turns through the real records code, each dated ``times[i]`` (begun, and ended a second on)."""
    log = DecisionLog(db)
    for when in times:
        decision = log.begin(DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", "cloud", "cloud", "test"))
        log.finish(decision, Outcome("ok", "cloud", "cloud", cost_usd=0.01))
        log.db.execute("UPDATE decisions SET created = ?, finished = ? WHERE id = ?", [when, when + 1, decision])
    log.close()


@pytest.mark.parametrize(
    ("name", "changed"),
    [
        ("America/New_York", (2026, 11, 1)),  # DST ends: a day of 25 hours
        ("America/New_York", (2026, 3, 8)),  # DST starts: a day of 23 hours
        ("Europe/Berlin", (2026, 10, 25)),
    ],
)
def test_the_reports_days_are_local_days_across_a_dst_change(
    zone: Callable[[str], None], tmp_path: Path, name: str, changed: tuple[int, int, int]
) -> None:
    """`locod report` over a week or more draws a bar a day. The days were counted as 86,400 s from the
    first midnight, so after the 25-hour day each began at 23:00: the day of the change was drawn twice
    (23:00 of it began the next bar, labelled with its date), and every later bar held a day's turns but
    the last hour's of the day before. Now each bar is a local day, from midnight to midnight."""
    zone(name)
    year, month, day = changed
    dates = [time.localtime(local(year, month, day + offset, 12)) for offset in range(-4, 5)]
    turns = [local(*d[:3], hour, minute) for d in dates for hour, minute in ((0, 30), (23, 30))]
    write_turns(tmp_path / "locod.db", turns)
    now = local(*dates[-1][:3], 23, 45)
    history = read_history(tmp_path / "locod.db", parse_since("10d"), now=now)
    assert history.bucket_s == DAY
    starts = [time.localtime(b.start) for b in history.buckets]
    assert all(s[3:6] == (0, 0, 0) for s in starts), [time.strftime("%m-%d %H:%M", s) for s in starts]
    by_day = {time.strftime("%Y-%m-%d", s): b.turns for s, b in zip(starts, history.buckets)}
    assert len(by_day) == len(history.buckets)  # no day drawn twice
    assert by_day == Counter(time.strftime("%Y-%m-%d", time.localtime(t)) for t in turns)


def test_the_reports_hours_begin_on_the_local_hour_in_a_half_hour_zone(
    zone: Callable[[str], None], tmp_path: Path
) -> None:
    """India is UTC+5:30: hours counted on UTC's grid began at :30 on the user's clock, and a turn at 10:45
    was drawn in the bar labelled 10:30. Now an hour's bar is the local hour."""
    zone("Asia/Kolkata")
    turns = [local(2026, 11, 20, 10, 45), local(2026, 11, 20, 11, 15)]
    write_turns(tmp_path / "locod.db", turns)
    history = read_history(tmp_path / "locod.db", parse_since("2d"), now=local(2026, 11, 21, 9, 0))
    assert history.bucket_s == 3600
    assert {time.localtime(b.start).tm_min for b in history.buckets} == {0}
    drawn = {time.strftime("%d %H:%M", time.localtime(b.start)): b.turns for b in history.buckets if b.turns}
    assert drawn == {"20 10:00": 1, "20 11:00": 1}
