"""The decision log's schema: table ``decisions`` as numbered migrations, each recorded in ``PRAGMA
user_version`` (daemon/records.py runs them at start, in one transaction), and the version of a log that
lost its number.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from contextlib import closing

import sqlite_utils

from locod.protocol import ANSWERED

# Rows a start counts or settles, each kept in an index of its own (migration 11); a query names the same
# WHERE to use it.
PENDING, SHADOWED = "outcome = 'pending'", "shadow IS NOT NULL"
WAS_ANSWERED = f"outcome IN {ANSWERED!r}"  # protocol.ANSWERED, in SQL
ESCALATED_JUDGED = "outcome = 'escalated' AND confidence IS NOT NULL"
# An escalated answer graded against the cloud's: an escalation label (within its index)
ESCALATION_LABELLED = f"{ESCALATED_JUDGED} AND json_extract(confidence, '$.label') IS NOT NULL"
PARTIAL_INDEXES = {
    "decisions_pending": PENDING,
    "decisions_shadowed": SHADOWED,
    "decisions_escalated": ESCALATED_JUDGED,
}


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("decisions").create(
        {
            "id": int,
            "created": float,
            "finished": float,
            "session": str,
            "turn": int,
            "request_id": str,
            "prompt_sha256": str,
            "prompt_chars": int,
            "prompt": str,
            "task": str,
            "attachments_offered": str,
            "attachments_sent": str,
            "telemetry": str,
            "features": str,
            "policy_version": str,
            "q": float,
            "sla": float,
            "v": float,
            "s_hat": str,
            "costs": str,
            "probabilities": str,
            "mask": str,
            "location": str,
            "model": str,
            "reason": str,
            "explored": int,
            "outcome": str,
            "error": str,
            "backend": str,
            "tokens_in": int,
            "tokens_out": int,
            "images_sent": int,
            "bytes_up": int,
            "latency_decide_ms": float,
            "latency_first_token_ms": float,
            "latency_total_ms": float,
            "cost_usd": float,
            "energy_j": float,
            "satisfied": int,
            "label_source": str,
            "labelled": float,
        },
        pk="id",
        not_null={"created", "session", "turn", "location", "model", "outcome"},
    )
    db.table("decisions").create_index(["created"])
    db.table("decisions").create_index(["session", "turn"])


def _migration_2(db: sqlite_utils.Database) -> None:
    """The chosen action (a candidate key such as ``gpt-mini|cloud+0``), so a record holds the whole
    decision; earlier rows keep NULL."""
    db.table("decisions").add_column("action", str)


def _migration_3(db: sqlite_utils.Database) -> None:
    """Whether ``cost_usd`` is an estimate; earlier rows keep NULL (unknown)."""
    db.table("decisions").add_column("cost_estimated", int)


def _migration_4(db: sqlite_utils.Database) -> None:
    """The shadow answer to a cloud-answered turn (JSON: model, satisfied, grader, tokens_out, latency_ms)."""
    db.table("decisions").add_column("shadow", str)


def _migration_5(db: sqlite_utils.Database) -> None:
    """The local answer's confidence where it was read (JSON: JudgedAnswer)."""
    db.table("decisions").add_column("confidence", str)


def _migration_6(db: sqlite_utils.Database) -> None:
    """How long the turn waited behind others for the local model before it was accepted (its latencies
    count from then); earlier rows keep NULL."""
    db.table("decisions").add_column("latency_queue_ms", float)


def _migration_7(db: sqlite_utils.Database) -> None:
    """The SHA-256 of an answer made from private material: a client that sends it back as its own history
    (an OpenAI client resends the whole conversation) does not get it sent to a cloud model."""
    db.table("decisions").add_column("private_answer", str)
    db.table("decisions").create_index(["private_answer"])


def _migration_8(db: sqlite_utils.Database) -> None:
    """The stable code of ``error`` (docs/protocol.md): a fallback's cause, an error's code, ``cancelled``, so
    that failures can be counted by kind rather than by their wording; earlier rows keep NULL."""
    db.table("decisions").add_column("error_code", str)


def _migration_9(db: sqlite_utils.Database) -> None:
    """An index on ``request_id``: `locod decisions chatcmpl-...` finds an HTTP completion's record by the id
    its client saw, without reading the whole log."""
    db.table("decisions").create_index(["request_id"])


def _migration_10(db: sqlite_utils.Database) -> None:
    """The openings of answers made from private material (``opening_digests``): a part of one that a client
    sends back is known too. Answers recorded before keep their whole digest only."""
    db.table("private_openings").create({"digest": str}, pk="digest")


def _migration_11(db: sqlite_utils.Database) -> None:
    """Partial indexes on the few rows a start looks for (turns left ``pending``, local labels): on a year
    of decisions a start read the whole file twice, a gigabyte per half a million turns."""
    for name, where in PARTIAL_INDEXES.items():
        db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON decisions(id) WHERE {where}")


def _migration_12(db: sqlite_utils.Database) -> None:
    """What a routed turn's answer moved MESS+'s queue by (its prediction for what answered), written with its
    completion: a start settles again the turns a kill cut between their ``done`` and the MESS+ state's save
    (earlier rows keep NULL, as do turns that were not routed)."""
    db.table("decisions").add_column("s_settled", float)


def _migration_13(db: sqlite_utils.Database) -> None:
    """The log's identity, made once with it and kept by its copies (``.backup``, ``VACUUM INTO``, ``cp``): the
    MESS+ state keeps it beside the decision ids it holds, and tells from it a log restored from a backup
    (the same turns under those ids, up to its newest) from another one (other turns under them)."""
    db.table("log_identity").create({"identity": str}, pk="identity")
    db.table("log_identity").insert({"identity": uuid.uuid4().hex})


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
    _migration_11,
    _migration_12,
    _migration_13,
]


def version_of_schema(conn: sqlite3.Connection) -> int:
    """The last migration whose tables, columns and indexes a log has all: the schema version of one that
    lost its ``user_version``. Started on as version 0, its first migration failed ("table decisions
    already exists") and the daemon did not start."""
    have = _schema_items(conn)
    scratch = sqlite3.connect(":memory:", isolation_level=None)
    version = 0
    with closing(scratch):
        for number, step in enumerate(MIGRATIONS, start=1):
            step(sqlite_utils.Database(scratch))
            if not _schema_items(scratch) <= have:
                break
            version = number
    return version


def schema_faults(conn: sqlite3.Connection, version: int) -> list[str]:
    """What a log at ``version`` lacks of the tables the migrations up to it make: a table or a column dropped
    or renamed by another program, or ``decisions.id`` as its key (a table rebuilt with ``CREATE TABLE ... AS
    SELECT``, which keeps no key). Without a column each turn was answered and its completion then failed ("no
    such column"); without the key a new turn's id was its rowid, an older turn's id, whose record its label
    then changed."""
    wanted, have = _made_by(version), _schema_items(conn)
    # a table gone (dropped, or a view at its name) is one fault, not one for each of its columns
    gone = {table for table, _ in wanted if table != "index"} - {table for table, _ in have}
    faults = sorted(f"table {table}" for table in gone)
    faults += sorted(f"column {table}.{column}" for table, column in wanted - have if table not in {"index", *gone})
    key = conn.execute("SELECT type, pk FROM pragma_table_info('decisions') WHERE name = 'id'").fetchone()
    if ("decisions", "id") in wanted & have and key != ("INTEGER", 1):
        faults.append("decisions.id as its INTEGER PRIMARY KEY")
    return faults


def added_under_writes(conn: sqlite3.Connection) -> list[str]:
    """What another program added to table ``decisions`` that refuses the daemon's writes of it: a trigger
    on it (one that raises, say), or a column NOT NULL without a default, which no row the daemon writes has
    a value for. SQLite's own words for either ("NOT NULL constraint failed", a trigger's message) named
    neither, and every turn was refused with them."""
    triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'decisions'")
    added = [f"trigger {name}" for (name,) in triggers]
    ours = {column for table, column in _made_by(len(MIGRATIONS)) if table == "decisions"}
    required = conn.execute(
        "SELECT name FROM pragma_table_info('decisions') WHERE \"notnull\" AND dflt_value IS NULL AND NOT pk"
    )
    return added + [f"column {name} NOT NULL without a default" for (name,) in required if name not in ours]


def _made_by(version: int) -> set[tuple[str, str]]:
    """``_schema_items`` of the tables the migrations up to ``version`` make."""
    scratch = sqlite3.connect(":memory:", isolation_level=None)
    with closing(scratch):
        for step in MIGRATIONS[:version]:
            step(sqlite_utils.Database(scratch))
        return _schema_items(scratch)


def _schema_items(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(table, column) of every column, and ("index", name) of every named index."""
    items = set()
    for kind, name in conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"):
        if kind == "table":
            items |= {(name, column) for (column,) in conn.execute("SELECT name FROM pragma_table_info(?)", [name])}
        elif kind == "index":
            items.add(("index", name))
    return items
