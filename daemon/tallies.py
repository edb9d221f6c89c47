"""Sums of the decision log kept in memory, so that what asks often never reads the whole log: today's spend
and answers, and what the cloud calls decided on may cost yet (``DailyTally``: every turn's decision asks,
for the daily cap) and /metrics' totals and latency histograms (``FinishedSums``: every scrape). Each is
read from the log once and then kept up to date; the log (records.py) owns both, and the read-only
connection they read through; the holds are in memory alone (a call under way is in the log as its turn's
pending row, which a restart marks interrupted, its most kept as spent).
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from locod.daemon.records_schema import PENDING, WAS_ANSWERED

# A read on the log's reading connection, named for its error (DecisionLog._reading).
Reading = Callable[[str], AbstractContextManager[sqlite3.Connection]]


@dataclass
class Today:
    """What was spent and answered between local midnight (``start``) and the next one (``end``)."""

    start: float
    end: float
    usd: float
    turns: int
    cloud: int


@dataclass(eq=False)
class Held:
    """What a cloud call decided on may cost at most (``DailyTally.hold``), counted against the daily cap from
    its decision until what it did cost is counted in its place (``DailyTally.count``'s ``releasing``), or it
    is given back unmade (``release``). Read against today's spend alone, turns decided together (before any
    had finished) each saw the whole of what was left of the cap, and together spent it several times."""

    usd: float
    released: bool = False


@dataclass(frozen=True)
class Counted:
    """What one count put in today's tally (``DailyTally.count``): ``usd``, net of the count it replaced, and
    ``day``, the local midnight of the tally it went to (None: none was read yet, so the log's read counts
    the row, and ``usd`` is what the count was given). A count that another is to replace (a call's most,
    held before it is made) is handed to that one as ``replacing``."""

    usd: float
    day: float | None


class DailyTally:
    """Today's spend and answers: read from the log once a day, then counted in memory as turns finish.

    A turn counts on the day it finished (money is spent as it is answered), read back the same way after a
    restart. Turns dated after today (written while the clock ran ahead, then corrected) are not today's:
    counted, they would spend the cap."""

    def __init__(self, reading: Reading) -> None:
        self._reading = reading
        self._lock = threading.Lock()  # the tally itself: held for a copy or a count, never across a read of the log
        # Held by a read of the log (the first, then one a day), and by a write of money from before it commits
        # until it is counted (``recording``): the read finds the write committed and its count goes to the tally
        # the read replaces, or finds neither and the count goes to the read's. A read between the commit and
        # the count counted the turn twice (at midnight, a turn paid as another's decision read the new day).
        self._rereading = threading.Lock()
        self._today: Today | None = None
        self._held = 0.0  # the unreleased ``Held``: calls of any day, which count on the day they finish
        # How many they are: with none left, nothing is held, exactly. Floats added and taken off in another
        # order leave a residue (0.1 + 0.2 - 0.1 - 0.2 is 2.8e-17), which overlapping calls left for good.
        self._holds = 0

    def read(self) -> Today:
        """A copy of today's tally: turns and cloud read together, never one before a turn counts."""
        today = self._current()
        if today is None:  # a new day, or the first read: read from the log, after the writes of money under way
            with self._rereading:
                today = self._current() or self._reread()  # another thread's read meanwhile may do
        return today

    def committed(self) -> float:
        """Today's spend and what the cloud calls decided on may cost yet: what the daily cap is counted
        against. Both read under one lock, so a call's cost and its hold (``count``) are never both, or
        neither, in it."""
        while True:  # again after a read of the log: a new day, or the first read
            now = time.time()
            midnight = local_midnight(now)
            with self._lock:
                today = self._today
                if _is_today(today, now, midnight):
                    return today.usd + self._held
            self.read()  # today's tally in place, read from the log

    def held(self) -> float:
        """What the cloud calls decided on may cost yet."""
        with self._lock:
            return self._held

    def hold(self, usd: float) -> Held:
        """Hold what a call may cost against the cap (see ``Held``)."""
        with self._lock:
            self._held += usd
            self._holds += 1
        return Held(usd)

    def release(self, held: Held) -> None:
        """Give back a hold whose call was never made (once; after ``count`` took it, nothing)."""
        with self._lock:
            self._release(held)

    def _release(self, held: Held) -> None:
        if not held.released:
            held.released = True
            self._holds -= 1
            self._held = self._held - held.usd if self._holds else 0.0

    def _current(self) -> Today | None:
        """A copy of the tally, if it is today's."""
        now = time.time()
        midnight = local_midnight(now)
        with self._lock:
            today = self._today
            return replace(today) if _is_today(today, now, midnight) else None

    def _reread(self) -> Today:
        today = self._read(time.time())
        with self._lock:
            self._today = today
            return replace(today)

    def _read(self, now: float) -> Today:
        midnight = local_midnight(now)
        next_midnight = local_midnight(midnight + 26 * 3600)  # 26 h on is always the next day, whatever DST does
        # ``created`` (indexed) narrows the read to the turns begun since the day before: what finishes today
        with self._reading("summing today's spending") as conn:
            usd, turns, cloud = conn.execute(
                f"SELECT TOTAL(cost_usd), TOTAL({WAS_ANSWERED}), TOTAL({WAS_ANSWERED} AND backend = 'cloud') "
                "FROM decisions WHERE created >= ? AND created < ? AND finished >= ? AND finished < ?",
                [midnight - 86400, next_midnight, midnight, next_midnight],
            ).fetchone()
        return Today(midnight, next_midnight, float(usd), int(turns), int(cloud))

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Around a write that records money spent and its ``count`` after it: a read of the log waits for
        both (``counting`` when the count comes whatever the write does)."""
        with self._rereading:
            yield

    @contextmanager
    def counting(
        self,
        usd: float,
        answered_by: str | None = None,
        replacing: Counted | None = None,
        releasing: Held | None = None,
    ) -> Iterator[None]:
        """Around the write that records money spent (and a turn answered, ``answered_by`` where it ran: local
        or cloud): counted once the write ends, committed or not, as the daily cap must see every dollar; in
        place of ``replacing`` and ``releasing`` (``count``)."""
        with self.recording():
            try:
                yield
            finally:
                self.count(usd, answered_by, replacing, releasing)

    def count(
        self,
        usd: float,
        answered_by: str | None = None,
        replacing: Counted | None = None,
        releasing: Held | None = None,
    ) -> Counted:
        """Count money spent now, and a turn answered, under ``recording`` when a write records them, in place
        of the hold ``releasing`` (together: the cap never sees both, nor neither). A count it replaces comes
        off the tally it went to only: one counted before midnight is not in today's, which a grading that
        ended after it took below zero (today's cap then let through more than the cap)."""
        with self._lock:
            if releasing is not None:
                self._release(releasing)
            today = self._today
            if today is None:  # not read yet: the read counts it
                return Counted(usd, None)
            if replacing is not None and replacing.day in (None, today.start):  # None: the read counted the row
                usd -= replacing.usd
            today.usd += usd
            if answered_by is not None:
                today.turns += 1
                today.cloud += answered_by == "cloud"
            return Counted(usd, today.start)


# /metrics' histogram buckets, in seconds: decisions take a few milliseconds, first tokens from tens of
# milliseconds to seconds. The log holds milliseconds.
HISTOGRAMS = {
    "latency_decide_ms": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    "latency_first_token_ms": (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
}
TOTALS = ("turns", "tokens_in", "tokens_out", "cost_usd", "energy_j")
COST = TOTALS.index("cost_usd")
# Per place and outcome: the totals, then each histogram's counts at or under its bounds, count and sum.
SUMMED = ", ".join(
    [
        ", ".join(["COUNT(*)", *(f"TOTAL({c})" for c in TOTALS[1:])]),
        *(
            ", ".join([*(f"TOTAL({c} <= {float(b * 1000)!r})" for b in bounds), f"COUNT({c}), TOTAL({c})"])
            for c, bounds in HISTOGRAMS.items()
        ),
    ]
)
SUM_SQL = (
    f"SELECT COALESCE(backend, location), outcome, {SUMMED} FROM decisions "
    f"WHERE NOT {PENDING} AND id > ? AND id <= ? GROUP BY 1, 2"
)
# The id up to which every turn has finished: the one before the oldest still running, else the newest.
SETTLED_SQL = (
    f"SELECT COALESCE((SELECT MIN(id) FROM decisions WHERE {PENDING}) - 1, (SELECT MAX(id) FROM decisions), 0)"
)
# Where each histogram's values begin in SUMMED's, and how many there are in all.
*_starts, WIDTH = itertools.accumulate((len(bounds) + 2 for bounds in HISTOGRAMS.values()), initial=len(TOTALS))
HISTOGRAM_AT = dict(zip(HISTOGRAMS, _starts))
Groups = dict[tuple[str, str], list[float]]  # (place, outcome) -> SUMMED's values


@dataclass(frozen=True)
class Finished:
    """Finished turns as one scrape reads them, by where they ended up running and how they ended."""

    groups: Groups

    def totals(self) -> list[dict[str, Any]]:
        """Each place and outcome's turns, tokens, money and energy."""
        return [
            {"location": where, "outcome": outcome, **dict(zip(TOTALS, values))}
            for (where, outcome), values in self.groups.items()
        ]

    def places(self) -> list[str]:
        """Where the finished turns ran (``local``, ``cloud``), each once."""
        return sorted({where for where, _ in self.groups})

    def histogram(self, column: str, where: str | None = None) -> tuple[list[int], int, float]:
        """(cumulative counts at or under each of HISTOGRAMS[column]'s bounds, count, sum in ms), of the turns
        that ran ``where``, or of all."""
        start = HISTOGRAM_AT[column]
        columns = range(start, start + len(HISTOGRAMS[column]) + 2)
        groups = [values for (place, _), values in self.groups.items() if where in (None, place)]
        *counts, count, total = [sum(values[i] for values in groups) for i in columns]
        return [int(c) for c in counts], int(count), float(total)


class FinishedSums:
    """/metrics' sums over finished turns, in one pass over the log: the turns before the oldest one still
    running are summed once and kept, only those after it are read again. Summed afresh each time, a scrape
    read the whole log (a gigabyte on a year of turns), once per metric, and held status meanwhile; the
    first scrape after a start still reads it once, in one pass, which is what counts that agree with the
    log itself cost (counted in memory since the start instead, they would say less than the log)."""

    def __init__(self, reading: Reading) -> None:
        self._reading = reading
        # Held by a scrape, and by a write that changes a summed turn (DecisionLog.add_cost) until its sums
        # are corrected: a scrape reads such a turn before the write or after the correction, never between.
        self.lock = threading.Lock()
        self._upto = 0  # every turn up to this id is in _kept
        self._kept: Groups = {}

    def read(self) -> Finished:
        with self.lock, self._reading("summing finished turns") as conn:
            settled = conn.execute(SETTLED_SQL).fetchone()[0]  # every turn up to it has finished
            if settled > self._upto:
                more: Groups = {}
                _add(more, conn.execute(SUM_SQL, [self._upto, settled]))  # whole: a read that fails keeps nothing
                _add(self._kept, ((*key, *values) for key, values in more.items()))
                self._upto = settled
            groups = {key: list(values) for key, values in self._kept.items()}
            _add(groups, conn.execute(SUM_SQL, [self._upto, 1 << 62]))
        return Finished(groups)

    def add_cost(self, decision_id: int, where: tuple[str, str] | None, usd: float) -> None:
        """Count money added to a finished turn (``where``: its place and outcome) once it is committed, with
        ``lock`` held since before the write: a turn already kept has it added here, a later one is read
        with it."""
        if where is not None and decision_id <= self._upto:
            self._kept.setdefault(where, [0.0] * WIDTH)[COST] += usd


def _add(groups: Groups, rows: Iterable[Sequence[Any]]) -> None:
    """Add grouped rows (place, outcome, then sums) into ``groups``."""
    for row in rows:
        values = groups.setdefault((row[0], row[1]), [0.0] * (len(row) - 2))
        for i, value in enumerate(row[2:]):
            values[i] += value or 0.0


def _is_today(today: Today | None, now: float, midnight: float) -> TypeGuard[Today]:
    """Whether ``today`` is the tally of the day ``now`` is in, begun at ``midnight``, its local midnight in
    the zone the machine is in now (mktime reads it again). Held to the day it was read for, a zone changed
    under the daemon (travel, ``timedatectl set-timezone``) kept the old zone's day until its midnight: a day
    more after flying east, while `locod report`, run in the new zone, counted the new one's."""
    return today is not None and today.start <= now < today.end and today.start == midnight


def local_midnight(now: float | None = None) -> float:
    """The first second of the local day ``now`` is in. Where a DST end at 01:00 repeats the day's first hour
    (Cuba), mktime may name either 00:00, as its last call guides it: the second one, an hour after the
    first pass's ``now``, made no tally today's, and the cap's check read the log forever."""
    t = time.localtime(now)
    day = (t.tm_year, t.tm_mon, t.tm_mday)
    midnight = time.mktime((*day, 0, 0, 0, 0, 0, -1))
    before = time.localtime(midnight - 1)
    if (before.tm_year, before.tm_mon, before.tm_mday) == day:  # the second 00:00: back to the first
        midnight -= before.tm_hour * 3600 + before.tm_min * 60 + before.tm_sec + 1
    return midnight
