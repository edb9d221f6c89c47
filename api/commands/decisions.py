"""``locod decisions`` (the newest records as a table, one decision explained, or JSON; read from the file
when no daemon runs) and ``locod feedback`` (a label for one of them)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from locod.commands.common import at_rest, configuration, connect, print_json
from locod.errors import DaemonNotRunning, StorageError, UnknownDecision
from locod.explain import explain
from locod.protocol import RecordQuery
from locod.terminal import aligned, shown
from locod.words import or_na


def cmd_decisions(args: argparse.Namespace) -> int:
    query = _query(args)
    try:
        with connect(args) as client:
            rows = client.decisions(
                query.limit,
                query.of,
                session=query.session,
                location=query.location,
                outcome=query.outcome,
                since=query.since,
                before=query.before,
            )
    except DaemonNotRunning:  # the log is a file: what happened can be read with the daemon stopped
        rows = _at_rest(args, query)
    narrowed = query.narrowing()
    if args.of is not None and not rows and not narrowed:
        raise UnknownDecision(f"no decision record has the id {args.of!r}; `locod decisions` lists the newest")
    if not rows and narrowed:  # a header alone would read as an empty log; the filters given, not all five
        given = " ".join(f"--{name} {shlex.quote(str(getattr(args, name)))}" for name in narrowed)
        print(shown(f"no decision record matches {given}"), file=sys.stderr)
    if args.of is None and len(rows) == query.limit:  # there may be older ones: how to read the page before
        print(f"older: {_older(args, min(row['id'] for row in rows))}", file=sys.stderr)
    if args.json:
        print_json(rows)
        return 0
    if args.of is not None:  # one decision: why it went where it did, in words
        print("\n".join(explain(rows[0])))
        return 0
    names = (
        "id",
        "time",
        "session",
        "turn",
        "task",
        "location",
        "model",
        "outcome",
        "tokens_out",
        "latency_total_ms",
        "cost_usd",
        "satisfied",
        "shadow",
        "reason",
    )
    table = [[_column(row, c) for c in names] for row in reversed(rows)]
    for line in aligned([names, *table]):  # the reason comes last and whole: it is the column people read
        print(line)
    return 0


def _at_rest(args: argparse.Namespace, query: RecordQuery) -> list[dict[str, Any]]:
    """The records from the log itself, with no daemon running; none before a daemon ever wrote one: a new
    user's first `locod decisions` is an empty answer, not a decision log that "cannot be used" (exit 4)."""
    from locod.daemon.records import NO_LOG, read_recent

    db_path = at_rest(configuration(args)).db_path
    try:
        rows = read_recent(db_path, query)
    except StorageError as exc:
        if exc.code != NO_LOG:
            raise
        print(
            f"(no decisions yet: locod is not running, and no daemon has written its decision log, {db_path}; "
            "`locod serve` starts one)",
            file=sys.stderr,
        )
        return []
    print(f"(locod is not running: read from {db_path})", file=sys.stderr)
    return rows


def _query(args: argparse.Namespace) -> RecordQuery:
    """The records the command line asks for; ``--since`` as the Unix time it reaches back to."""
    from locod.daemon.history import parse_since

    since = None if args.since is None else time.time() - parse_since(args.since)
    return RecordQuery(args.limit, args.of, args.session, args.location, args.outcome, since, args.before)


def _older(args: argparse.Namespace, oldest: int) -> str:
    """The command that shows the page before this one: the same narrowing, below its oldest id."""
    words = ["locod", "decisions"]
    if args.limit != 20:
        words += ["--limit", str(args.limit)]
    for flag in ("session", "location", "outcome", "since"):
        if getattr(args, flag) is not None:
            words += [f"--{flag}", getattr(args, flag)]
    words += ["--before", str(oldest)]
    if args.json:
        words.append("--json")
    return shown(shlex.join(words), layout=False)  # a session id a client chose: no escape sequence


def _column(row: dict[str, Any], column: str) -> str:
    try:
        return _formatted(row, column)
    except (TypeError, ValueError, KeyError):  # a value of a type locod does not write: another program's row
        return _cell(row.get(column))


def _formatted(row: dict[str, Any], column: str) -> str:
    if column == "time":
        return _time(row["created"])
    if column == "cost_usd" and row.get("cost_usd") is not None:  # dollars as `ask -v` prints them, not 4.1e-05
        return f"{row['cost_usd']:.5f}"
    if column == "latency_total_ms" and row.get(column) is not None:  # whole ms as `ask -v` prints them, not 1.4e+04
        return f"{row[column]:.0f}"
    if column == "location":  # where it was answered, as `model` is the model that answered (after a fallback
        return _cell(row.get("backend") or row.get("location"))  # or an escalation); decided: --json's location
    if column == "shadow":  # the local model's background answer to a cloud turn, as graded
        shadow = row.get("shadow")
        return "-" if not shadow else "good" if shadow["satisfied"] else "bad"
    return _cell(row.get(column))


def _time(created: float) -> str:
    """Local time of day, with the date when it is not today."""
    moment = time.localtime(created)
    today = time.localtime()[:3] == moment[:3]
    return time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M", moment)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return shown(str(value), layout=False)  # a client's session id: no escape sequence, one line per row


def cmd_feedback(args: argparse.Namespace) -> int:
    with connect(args) as client:
        result = client.feedback(args.decision, args.label == "good")
    labelled = f"decision {result['decision']} labelled {'good' if result['satisfied'] else 'bad'}"
    if "sla" not in result:  # a daemon of before the feedback result said it
        print(f"{labelled}; Q is now {result['q']:.2f}")
        return 0
    if result.get("routed") is False:  # an older daemon's result has no such field
        print(
            f"{labelled}; the request or the config chose where it ran (--force, --model, routing.mode): no part "
            f"of the SLA ({or_na(result['attained'], '{:.3f}')} so far against {result['sla']:.2f}, over routed turns) "
            "and MESS+ does not learn from it; `locod policy train --from-db` does"
        )
        return 0
    print(
        f"{labelled}; satisfaction so far {or_na(result['attained'], '{:.3f}')} against the SLA {result['sla']:.2f}; "
        f"queue Q now {result['q']:.2f} (the shortfall the turns left: a higher Q sends more to the cloud)"
    )
    return 0
