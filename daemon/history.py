"""What the router did over a period, as time series read from the decision log (for ``locod report``).

The log is opened read-only, so a report can be drawn while the daemon runs (WAL lets both proceed).
Turns are grouped into buckets: the smallest of a minute, 5 or 15 minutes, an hour or a day that keeps a
period within 48 buckets (a week is drawn by day, two days by hour).
"""

from __future__ import annotations

import bisect
import math
import re
import sqlite3
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from locod.daemon.records import iter_rows, read_rows
from locod.daemon.records_schema import ESCALATION_LABELLED, SHADOWED
from locod.daemon.tallies import local_midnight
from locod.errors import RequestError
from locod.protocol import ANSWERED

UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
BUCKETS_S = (60, 300, 900, 3600, 86400)
MAX_BUCKETS = 48
# Where each turn was answered (after a fallback or an escalation, not where it was first sent).
COLUMNS = (
    "created, finished, COALESCE(backend, location) AS location, outcome, satisfied, label_source, q, sla, cost_usd, "
    "cost_estimated, energy_j, latency_first_token_ms, tokens_in, tokens_out, "
    f"({SHADOWED}) AS shadow_label, ({ESCALATION_LABELLED}) AS escalation_label"
)
# Labels of local answers the user never saw, graded against the cloud's: counted as `locod status` counts them.
LOCAL_LABELS = ("shadow", "escalation")

# The period's first turn, and the SLA of its newest routed one (each an index search on ``created``).
EDGES = (
    "SELECT (SELECT MIN(created) FROM decisions WHERE created >= ? AND created <= ?), "
    "(SELECT sla FROM decisions WHERE created >= ? AND created <= ? AND sla IS NOT NULL ORDER BY created DESC "
    "LIMIT 1)"
)


def parse_since(text: str) -> float:
    """``30m``, ``12h``, ``7d``, ``4w`` -> seconds. A period past a double's range (hundreds of digits) is
    refused here: as infinity it reached the daemon as ``since`` -Infinity, refused in the protocol's words."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text)
    seconds = float(match.group(1)) * UNITS[match.group(2)] if match else 0.0
    if not 0 < seconds < math.inf:
        raise RequestError(f"--since expects a period like 30m, 12h, 7d or 4w, got {text!r}")
    return seconds


@dataclass
class Bucket:
    start: float
    turns: int = 0
    cloud: int = 0
    routed: int = 0  # turns MESS+ routed (``sla`` recorded): the ones the SLA is about, not forced or named ones
    labelled: int = 0  # of the routed turns
    satisfied: int = 0
    cost_usd: float = 0.0
    estimated: int = 0  # turns priced from their text: the endpoint reported no usage
    energy_j: float = 0.0
    local_tokens: list[int] = field(default_factory=lambda: [0, 0])  # in and out of the answers given locally
    q_sum: float = 0.0  # of the routed turns' Q, ``q_count`` of them
    q_count: int = 0
    first_token_ms: dict[str, list[float]] = field(default_factory=lambda: {"local": [], "cloud": []})
    labels: dict[str, int] = field(default_factory=dict)  # label source (or one of LOCAL_LABELS) -> count

    @property
    def cloud_share(self) -> float:
        return self.cloud / self.turns if self.turns else 0.0

    @property
    def mean_q(self) -> float | None:
        return self.q_sum / self.q_count if self.q_count else None

    @property
    def satisfaction(self) -> float | None:
        return self.satisfied / self.labelled if self.labelled else None

    def median_first_token(self, location: str) -> float | None:
        values = self.first_token_ms[location]
        return statistics.median(values) if values else None


@dataclass
class History:
    since: float
    until: float
    bucket_s: float
    sla: float | None  # the target the newest routed turn was routed under
    buckets: list[Bucket]
    # USD by the local day a turn finished, as the daily cap counts it (``daily_cost``); the buckets' cost is
    # by the day a turn began, so a turn across midnight counted a day the cap did not
    spent_by_day: dict[str, float] = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return sum(b.turns for b in self.buckets)

    def attained(self) -> list[float | None]:
        """The satisfied share of the labelled routed turns so far, at the end of each bucket. Not MESS+'s
        attainment (``locod status``), which counts an unlabelled turn by its prediction."""
        out: list[float | None] = []
        labelled = satisfied = 0
        for b in self.buckets:
            labelled, satisfied = labelled + b.labelled, satisfied + b.satisfied
            out.append(satisfied / labelled if labelled else None)
        return out


def read_history(db_path: Path, period_s: float, now: float | None = None) -> History:
    """The turns of the last ``period_s`` seconds in the decision log at ``db_path``, bucketed. The period
    starts no earlier than its first turn: ``--since 5200w`` costs what the log holds, not a century of
    empty buckets. Rows are read one at a time into the buckets: a year is a million of them."""
    until = time.time() if now is None else now
    period = [until - period_s, until]
    # The newest routed turn's SLA: a forced or named turn records none, and is no reason to say "n/a".
    first, sla = read_rows(db_path, EDGES, period * 2)[0]
    since = max(until - period_s, until if first is None else first)
    bucket_s = float(next((b for b in BUCKETS_S if (until - since) / b <= MAX_BUCKETS), BUCKETS_S[-1]))
    starts = bucket_starts(since, until, bucket_s)
    buckets = [Bucket(start) for start in starts]
    sql = f"SELECT {COLUMNS} FROM decisions WHERE created >= ? AND created <= ?"
    spent: dict[str, float] = {}
    for row in iter_rows(db_path, sql, period):
        _add(buckets[max(bisect.bisect_right(starts, row["created"]) - 1, 0)], row)
        if row["outcome"] != "pending" and row["cost_usd"]:
            day = _day(row["finished"])
            spent[day] = spent.get(day, 0.0) + row["cost_usd"]
    return History(since, until, bucket_s, sla, buckets, spent)


def bucket_starts(since: float, until: float, bucket_s: float) -> list[float]:
    """Where the buckets from ``since`` to ``until`` begin, on the local clock: a day's at local midnight, a
    shorter bucket's on the local hour's grid. Days counted as 86,400 s drifted an hour at each DST change
    (after the 25-hour day every bucket began at 23:00 and was labelled the day before the one it mostly
    held), and a grid of UTC hours began each hour at :30 in India, as the grid of the period's first second
    did after a half-hour DST change (Lord Howe Island)."""
    if bucket_s >= 86400:
        days = [local_midnight(since)]
        while (later := local_midnight(days[-1] + 26 * 3600)) <= until:  # 26 h on is the next day, DST or not
            days.append(later)
        return days
    starts = [_on_the_grid(since, bucket_s)]
    while (later := _on_the_grid(starts[-1] + bucket_s, bucket_s)) <= until:  # always past the last start
        starts.append(later)
    return starts


def _on_the_grid(when: float, bucket_s: float) -> float:
    """The start of the bucket of ``bucket_s`` that holds ``when`` on the local clock then."""
    return when - (when + time.localtime(when).tm_gmtoff) % bucket_s


def _day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(when))


def _add(bucket: Bucket, row: sqlite3.Row) -> None:
    bucket.turns += 1
    bucket.cloud += row["location"] == "cloud"
    if row["outcome"] != "pending":  # a turn still running holds its most, not what it spent (DecisionRecord)
        bucket.cost_usd += row["cost_usd"] or 0.0
        bucket.estimated += bool(row["cost_estimated"])
    bucket.energy_j += row["energy_j"] or 0.0
    if row["location"] == "local" and row["outcome"] in ANSWERED:
        bucket.local_tokens[0] += row["tokens_in"] or 0
        bucket.local_tokens[1] += row["tokens_out"] or 0
    if row["q"] is not None:
        bucket.q_sum += row["q"]
        bucket.q_count += 1
    if row["latency_first_token_ms"] is not None and row["location"] in bucket.first_token_ms:
        bucket.first_token_ms[row["location"]].append(row["latency_first_token_ms"])
    if row["sla"] is not None:
        bucket.routed += 1
    if row["satisfied"] is not None:
        if row["sla"] is not None:  # a forced turn's label is collected (below), but the SLA does not cover it
            bucket.labelled += 1
            bucket.satisfied += row["satisfied"]
        _count_label(bucket, row["label_source"] or "unknown")
    for kind in LOCAL_LABELS:
        if row[f"{kind}_label"]:
            _count_label(bucket, kind)


def _count_label(bucket: Bucket, kind: str) -> None:
    bucket.labels[kind] = bucket.labels.get(kind, 0) + 1


def daily_cost(history: History) -> dict[str, float]:
    """USD spent per local calendar day of the period, whatever the bucket size: by the day each turn
    finished, as the daily cap counts it (``locod status``'s ``spent_today_usd``); a turn still running
    has spent nothing yet."""
    out = dict.fromkeys((_day(b.start) for b in history.buckets), 0.0)
    for day, usd in history.spent_by_day.items():
        out[day] = out.get(day, 0.0) + usd
    return dict(sorted(out.items()))
