"""The decision log: one row per accepted turn in table ``decisions`` of ``<state dir>/locod.db``.

A row is inserted (outcome ``pending``) when a turn is accepted and completed before its ``done`` frame is
sent, both committed durably (WAL, ``synchronous=FULL``). A row still ``pending`` at start-up belongs to a
daemon that died mid-turn and is marked ``interrupted``: accepted turns are never silently lost. A
completion that cannot be written (the disk is full) is kept in memory (bounded) and written with the
next write that succeeds, or when the log closes: the turn's client is told its record is not committed
yet, and the record is not left for the next start to call "daemon stopped during the turn".
Schema changes are numbered migrations recorded in ``PRAGMA user_version`` (daemon/records_schema.py).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlite_utils

from locod import __version__
from locod.daemon.decision import NO_ROUTING_COLUMNS, Routing
from locod.daemon.log_files import LogFiles, file_identity
from locod.daemon.ownership import closed_to_this_user
from locod.daemon.records_schema import (
    ESCALATION_LABELLED,
    MIGRATIONS,
    PENDING,
    SHADOWED,
    WAS_ANSWERED,
    added_under_writes,
    schema_faults,
    version_of_schema,
)
from locod.daemon.tallies import Counted, DailyTally, FinishedSums, Held
from locod.errors import StorageError, UnknownDecision
from locod.policy.logged import LoggedTurn, logged_observation
from locod.protocol import ANSWERED, RecordQuery
from locod.words import counted

log = logging.getLogger(__name__)

SQLITE_FULL = 13  # sqlite3.SQLITE_FULL from Python 3.11 on
MIN_FREE_BYTES = 1 << 20  # less room than this, at start: the disk is full, whatever SQLite calls it
MAX_PAGE_BYTES = 1 << 16  # SQLite's largest page: a file this near the file size limit may not grow a page
MAX_UNWRITTEN = 1000  # completions kept in memory while the disk is full; beyond, the oldest are given up
BUSY_WAIT_S = 10.0  # how long a write waits for another process's lock on the file (a turn's record)
# StorageError's code for a log that is not there at all: none was written yet (a new user's `locod decisions`
# reads it as no decisions), unlike one that cannot be used (a directory at its name, closed to this user).
NO_LOG = "no_log"
PROMPT_SHOWN = 2000  # characters of a logged prompt the `decisions` op returns
# A checkpoint empties the WAL (``locod.db-wal``) every thousand pages unless a reader holds a transaction
# open; past WAL_WARN_BYTES one does, and the daemon says so (again at each doubling). Emptied, the file
# is cut back to WAL_KEPT_BYTES: without that it kept the size it grew to.
WAL_WARN_BYTES, WAL_KEPT_BYTES = 64 << 20, 16 << 20
# A migration of a log past MIGRATE_SAID_MB is said before it runs (each step may read the whole file), with
# the time systemd should allow for it: MIGRATE_S_PER_MB a megabyte (an SD card reads 20 MB/s or less).
MIGRATE_SAID_MB, MIGRATE_S_PER_MB = 32, 0.5
LABEL_WAIT_S = 3.0  # a label's: its client waits for the answer, and gives up after 10 s


@dataclass
class DecisionRecord:
    """What was decided for one turn and why: the columns of ``decisions`` written when it is accepted."""

    session: str
    turn: int
    request_id: str
    prompt_sha256: str
    prompt_chars: int
    prompt: str | None
    task: str
    location: str
    model: str
    reason: str
    attachments_offered: list[dict[str, Any]] = field(default_factory=list)
    attachments_sent: list[str] = field(default_factory=list)
    telemetry: dict[str, Any] = field(default_factory=dict)
    explored: bool = False
    latency_decide_ms: float = 0.0
    latency_queue_ms: float = 0.0  # waiting behind other turns for the local model, before it was accepted
    # A cloud turn's: what its call may cost, kept until the completion writes what it did cost, so that a
    # daemon killed during the call leaves it counted against the daily cap (``cost_estimated`` set).
    cost_usd: float | None = None
    routing: Routing | None = None  # its columns: Routing.columns()

    def row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "routing"}
        row.update(NO_ROUTING_COLUMNS if self.routing is None else self.routing.columns())
        return row


@dataclass(frozen=True)
class JudgedAnswer:
    """A local answer whose confidence was read (column ``confidence``): what its label trains the model's
    confidence head on (policy/confidence.py), and whether it was kept or the turn escalated."""

    model: str
    features: tuple[float, ...]  # policy.confidence.FEATURES over the judged tokens
    s_prompt: float  # the model's s_hat before it answered
    s_answered: float  # after its confidence was read
    kept: bool  # the user got this answer: kept at the checkpoint, or shown when the cloud failed after it
    label: bool | None = None  # an escalated answer, graded against the cloud's (word overlap)
    task: str = ""  # the turn's task category: the head corrects its reading per task ("" in older records)
    explored: bool = False  # the checkpoint's choice was an exploration turn

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> JudgedAnswer | None:
        if not data:
            return None
        return cls(**{**data, "features": tuple(data["features"])})


@dataclass(frozen=True)
class CostHold:
    """What a call made for a turn that has ended (the judge's grading) may cost, counted before the call
    (``DecisionLog.hold_cost``) and replaced by what it did cost (``add_cost``): a daemon killed during the
    call leaves the most it may cost in the turn's cost and so in today's spend, as a cloud turn's record does."""

    usd: float
    error: str | None = None  # why the turn's row does not hold it (a failed write); today's spend does
    counted: Counted | None = None  # what today's spend has of it, and which day's: what ``add_cost`` takes off


@dataclass
class Outcome:
    """How the turn ended; filled in before the ``done`` frame."""

    outcome: str  # ok | fallback | escalated | error | cancelled
    backend: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    images_sent: int = 0
    bytes_up: int = 0
    latency_first_token_ms: float | None = None
    latency_total_ms: float = 0.0
    cost_usd: float = 0.0
    cost_estimated: bool = False  # priced (in whole, or a cut stream's part) from characters: no believable usage
    energy_j: float = 0.0
    error: str | None = None
    error_code: str | None = None  # error's stable code: a fallback's cause, an error's code, cancelled
    attachments_sent: list[str] | None = None
    confidence: JudgedAnswer | None = None
    private_answer: str | None = None  # SHA-256 of an answer made from private material, to know it again
    private_openings: tuple[str, ...] = ()  # and of its first words (``opening_digests``), to know a part of it
    s_settled: float | None = None  # a routed answer's prediction, which MESS+'s queue settles with
    # The features (``RecordedFeatures.to_json``) of the action that answered, where it is not the one the record
    # was begun with (an escalation, a fallback): what a label trains that model on. None: as begun.
    features: dict[str, Any] | None = None


@dataclass(frozen=True)
class ShadowResult:
    """The local model's background answer to a cloud-answered turn, graded against the cloud's."""

    model: str
    satisfied: bool
    grader: str  # overlap | judge
    tokens_out: int
    latency_ms: float


@dataclass(frozen=True)
class LabelTarget:
    """A labelled turn as the learner needs it: who answered, and what the rule weighed (None if it was
    not routed)."""

    decision_id: int
    model: str
    routing: Routing | None
    confidence: JudgedAnswer | None = None  # the local answer that was labelled, where its confidence was read


JSON_COLUMNS = (
    "attachments_offered",
    "attachments_sent",
    "telemetry",
    "features",
    "s_hat",
    "costs",
    "probabilities",
    "mask",
    "shadow",
    "confidence",
)


class DecisionLog:
    """The daemon's two connections, shared by its threads: the writer, one write at a time, and a read-only
    one for status, the `decisions` op and /metrics, which never waits behind a write. What is summed over
    the log and kept in memory (``today``, ``finished``) is tallies.py's; the writes here keep it current."""

    def __init__(self, path: Path, migrating: Callable[[str, float], None] | None = None) -> None:
        """Open the log, migrate it and mark what an earlier daemon left running, then open its reader.
        ``migrating(what, seconds)``: told before a long migration, with how long it may take."""
        self.path = path
        self._migrating = migrating
        self._conn = _open_writer(path)
        self.db = sqlite_utils.Database(self._conn)
        self._files = LogFiles(path)  # the files the writer writes (``_check_in_place``)
        self._lost: str | None = None  # why no write may go into the files again (``_lose_wal``)
        self._lock = threading.Lock()  # the writer connection: held while a write waits for SQLite's lock
        self.wal_warning: str | None = None  # why the WAL outgrew WAL_WARN_BYTES, while it does (status)
        self.shm_warning: str | None = None  # that the -shm file was replaced under the daemon (``_watch_shm``)
        self._failing: StorageError | None = None  # the last write's failure, until a write succeeds (status)
        self._wal_warned = 0  # the WAL's size when that was last logged
        self._unwritten: dict[int, dict[str, Any]] = {}  # decision -> its completion, not on disk yet
        self.interrupted_at_start = self._migrate_and_mark_interrupted()
        self._recent_sql = _recent_query(self.db["decisions"].columns_dict)
        self._reader = _open_reader(path)
        self._read_lock = threading.Lock()
        self.today = DailyTally(self._reading)  # what the daily cap and status ask every turn
        self.finished = FinishedSums(self._reading)  # what /metrics asks every scrape

    def _migrate_and_mark_interrupted(self) -> int:
        """The start's one write: the schema brought up to this code's, and the turns a daemon that died
        mid-turn left ``pending`` marked ``interrupted``. Returns how many it marked."""
        with self._writing("migrate"):
            found = self._migrate()
            # finished: when this start found it so, and never before it began: a Jetson without an RTC that
            # restarts in 1970 dated a turn of today's as finished then, its most spent on a day NTP then left
            interrupted = self.db.execute(
                "UPDATE decisions SET outcome = 'interrupted', error = 'daemon stopped during the turn', "
                f"finished = MAX(?, created) WHERE {PENDING}",
                [time.time()],
            ).rowcount
        if 0 < found < len(MIGRATIONS):  # said once committed: an upgrade's way back is its backup now
            log.info(
                "decision log %s migrated from schema %d to %d: a locod older than this one cannot use it now, "
                "so a backup taken before the upgrade is the way back (docs/operations.md, Upgrades)",
                self.path,
                found,
                len(MIGRATIONS),
            )
        return interrupted

    @contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            try:
                yield self._reader
            except sqlite3.Error as exc:
                raise StorageError(f"decision log {self.path}: {what} failed: {exc}") from None

    @contextmanager
    def _writing(self, what: str, wait_s: float | None = None) -> Iterator[None]:
        """One write transaction. A turn's writes (``wait_s`` None) wait their turn for this process's writer
        and up to ``BUSY_WAIT_S`` for a lock another process holds; a shorter ``wait_s`` is one deadline for
        both waits (the writer may itself be waiting for that lock)."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        if not self._lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise _write_failed(self.path, what, sqlite3.OperationalError("database is locked"))
        try:
            self._check_in_place(what)
            try:
                if deadline is not None:
                    left_ms = max(1, int((deadline - time.monotonic()) * 1000))
                    self._conn.execute(f"PRAGMA busy_timeout = {left_ms}")
                try:
                    with self._conn:  # BEGIN ... COMMIT, or ROLLBACK on error
                        self._conn.execute("BEGIN IMMEDIATE")
                        yield
                finally:
                    if deadline is not None:
                        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_WAIT_S * 1000)}")
            except sqlite3.IntegrityError as exc:
                raise self._refused_by_table(what, exc) from None
            except sqlite3.Error as exc:
                raise _write_failed(self.path, what, exc) from None
            self._files.know()
            self._check_wal_intact(what)  # this write's too: not said done when it went into a damaged file
            self._watch_wal()
            self._watch_shm()
            self._files.note_written()
            self._say_writable_again()
        except StorageError as exc:
            self._say_write_failed(exc)
            raise
        finally:
            self._lock.release()

    def _refused_by_table(self, what: str, exc: sqlite3.IntegrityError) -> StorageError:
        """The error of a write a constraint refused: by name, when another program changed the table under
        the daemon (every turn is refused until that is undone)."""
        added = added_under_writes(self._conn)
        if not added:
            return _write_failed(self.path, what, exc)
        return StorageError(
            f"decision log {self.path}: {what} failed: table decisions was changed under the daemon, and no turn "
            f"can be recorded until that is undone: {', '.join(added)} (SQLite: {exc}); drop what was added "
            "(`DROP TRIGGER`, `ALTER TABLE decisions DROP COLUMN`), or give the column a default "
            "(docs/operations.md, The decision log)",
            code="db_changed",
        )

    def _say_write_failed(self, exc: StorageError) -> None:
        """A refused write is told to the client that asked, and logged once a cause until a write succeeds:
        a service whose log was deleted, or whose disk was full, refused every turn with nothing in its
        journal for its admin to find."""
        if self._failing is None or exc.code != self._failing.code:
            log.warning("%s", exc.message)
        self._failing = exc

    def _say_writable_again(self) -> None:
        if self._failing is not None:
            self._failing = None
            log.info("decision log %s is written again", self.path)

    @property
    def warning(self) -> str | None:
        """What ``status`` says of the log: that it was replaced under the daemon (every turn is refused until
        a restart, so checked afresh as a write checks it, unless a write is under way and checks it itself),
        else that its last write failed (a full disk, a lock held: turns are refused and answered turns'
        completions held back until a write succeeds), else that its WAL outgrew what checkpoints keep it to,
        else that its -shm file was replaced (checked afresh)."""
        if self._lock.acquire(blocking=False):  # never waits behind a write (which waits up to BUSY_WAIT_S)
            try:
                self._check_in_place("writing")
            except StorageError as exc:
                return exc.message
            finally:
                self._lock.release()
        failing, held = self._failing, len(self._unwritten)
        if failing is not None:
            message = f"no write has succeeded since this one failed: {failing.message}"
            return message + (f"; the records of {counted(held, 'answered turn')} are held in memory" if held else "")
        self._watch_shm()
        return self.shm_warning or self.wal_warning

    def _watch_wal(self) -> None:
        """Say when the WAL outgrows what checkpoints keep it to: a reader holding a transaction open (a
        sqlite3 shell after ``BEGIN``, a notebook's unfinished cursor) stops them, and every turn then
        grows the file until it lets go. Silent, it filled the disk."""
        size = self._files.wal_size()
        if size is None:
            return
        if size < WAL_WARN_BYTES:
            if self.wal_warning is not None:
                log.info("decision log %s: its WAL is checkpointed again (%d MiB)", self.path, size >> 20)
                self.wal_warning, self._wal_warned = None, 0
            return
        if size < 2 * self._wal_warned:
            return
        self._wal_warned = size
        self.wal_warning = (
            f"the decision log's WAL {self.path}-wal has grown to {size >> 20} MiB: another process holds a read "
            "transaction open on it (a sqlite3 shell after BEGIN, a notebook's cursor), so it cannot be "
            "checkpointed; end that transaction and it shrinks back (docs/operations.md, The decision log)"
        )
        log.warning("%s", self.wal_warning)

    def _watch_shm(self) -> None:
        """Say when ``locod.db-shm`` is no longer the file this daemon's connections share. SQLite keeps the
        WAL's index and its writers' locks there: a program that opens the log after it was removed (a
        "stale file" deleted) makes a new one and sees neither, so what it writes (the pruning in
        docs/operations.md, a sqlite3 shell's UPDATE) the daemon's next writes overwrite in the WAL, or its
        stop's checkpoint, silently. The daemon's own records are kept, so it goes on serving; a restart
        makes it share the file at that path again."""
        shm = self._files.shm
        if shm is None or self.shm_warning is not None or file_identity(self._files.shm_path) == shm:
            return
        self.shm_warning = (
            f"the decision log's {self.path}-shm file was removed or replaced while the daemon ran: other programs "
            "no longer see the daemon's locks on the log, and what one writes to it (a pruning DELETE, a sqlite3 "
            "shell's UPDATE) the daemon's own writes undo; restart the daemon (`locod stop`, then start it) "
            "before writing to the log with another program (docs/operations.md, The decision log)"
        )
        log.warning("%s", self.shm_warning)

    def _check_wal_intact(self, what: str) -> None:
        """Refuse a write once ``locod.db-wal`` no longer starts as SQLite writes one: emptied in place
        (``truncate -s 0`` to win back room) or overwritten while the daemon ran. Its turns since the last
        checkpoint are gone, but this connection's index still names their frames: the daemon answered on, each
        record written past a hole no other reader, nor the next start, could read, and a clean stop's
        checkpoint copied that hole into ``locod.db`` (malformed). Called holding the writer's lock, before
        (``_check_in_place``) and after each write (a write meanwhile would fill the file again)."""
        if self._lost is None and not self._files.wal_intact():
            self._lose_wal(
                f"its -wal file {self._files.wal_path} was emptied or overwritten while the daemon ran: the turns "
                "it held since the last checkpoint are lost, and so would be any written now; restart the daemon "
                "(`locod stop`, then start it), which leaves locod.db as that checkpoint left it"
            )
        if self._lost is not None:
            raise StorageError(f"decision log {self.path}: {what} failed: {self._lost}", code="db_replaced")

    def _lose_wal(self, why: str) -> None:
        """Refuse every write from now on, and empty the -wal file: the daemon's stop then finds nothing to
        checkpoint into ``locod.db`` (a checkpoint of frames meant for another file left it malformed), and
        leaves it as it is."""
        with suppress(OSError):
            os.truncate(self._files.wal_path, 0)
        self._lost = why

    def _check_in_place(self, what: str) -> None:
        """Refuse a write when the file at ``path`` is no longer the one this connection writes: removed or
        replaced while the daemon ran, what it wrote would be gone at its next start, and every accepted
        turn's record with it. So with its -wal file: other readers no longer see what it holds, and a
        crash loses it; and once that file was found emptied (``_check_wal_intact``). Overwritten in place
        (``cp backup.db locod.db``), its pages are no longer those this connection holds and writes after:
        the next write, or the stop's checkpoint, left it malformed."""
        self._check_wal_intact(what)
        changed = self._files.changed()
        if changed == "wal":
            raise StorageError(
                f"decision log {self.path}: {what} failed: its -wal file was removed or replaced while the daemon "
                "ran, and the turns it held since the last checkpoint are in the daemon's copy alone; stop the "
                "daemon cleanly (`locod stop`), which writes them into the file, and start it again",
                code="db_replaced",
            )
        if changed == "db":
            raise StorageError(
                f"decision log {self.path}: {what} failed: the file was removed or replaced while the daemon "
                "ran, so nothing written now would be kept; restart the daemon to open the one at that path",
                code="db_replaced",
            )
        if changed == "rewritten":
            self._lose_wal(
                "the file was overwritten in place while the daemon ran (a backup restored with cp?): its pages "
                "are no longer those the daemon writes after, so nothing more is written to it; restart the daemon "
                "(`locod stop`, then start it), which opens it as it is now"
            )
            self._check_wal_intact(what)

    def _migrate(self) -> int:
        """Bring the schema up to this code's, in the start's one transaction: a daemon killed midway leaves
        the file as it was (never columns added with ``user_version`` not bumped). Returns the version found
        (0: a new log)."""
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and "decisions" in self.db.table_names():
            version = version_of_schema(self._conn)
            if version == 0:
                raise StorageError(
                    f"decision log {self.path} holds a table decisions that is not locod's (another program's "
                    "file?): move it aside, or point paths.state_dir elsewhere, and start again; nothing was "
                    "written to it"
                )
            log.warning(
                "decision log %s has its tables but no schema version (rebuilt with sqlite3's .dump or .recover, "
                "which do not keep it): its tables and columns are those of version %d, migrated on from there",
                self.path,
                version,
            )
            self._conn.execute(f"PRAGMA user_version = {version}")
        faults = schema_faults(self._conn, version)
        if faults:
            raise StorageError(
                f"decision log {self.path} is at schema version {version} but lacks {', '.join(faults)}: another "
                "program changed its tables, and turns recorded in it would not be what they say; restore a backup "
                "(docs/operations.md, Backing up and restoring), or move it aside, and start again; nothing was "
                "written to it"
            )
        self._say_migrating(version)
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            try:
                step(self.db)
            except sqlite_utils.db.NoTable as exc:  # a view at the name of a table the step makes or alters
                raise StorageError(
                    f"decision log {self.path} cannot be migrated to schema version {number}: {exc} (another "
                    "program's, at the name of one of locod's tables); move the file aside, or drop that view, and "
                    "start again; nothing was written to it"
                ) from None
            self._conn.execute(f"PRAGMA user_version = {number}")
        return version

    def _say_migrating(self, version: int) -> None:
        """Say a migration of a big log before it runs: on a year of turns it reads the file once a step,
        minutes on an SD card, and systemd's start timeout (90 s) killed it midway, rolled back, again at
        every restart."""
        mb = self.path.stat().st_size >> 20
        if version == len(MIGRATIONS) or version == 0 or mb < MIGRATE_SAID_MB:
            return
        what = f"migrating the decision log {self.path} ({mb} MB) from schema {version} to {len(MIGRATIONS)}"
        log.info("%s: a start after an upgrade reads it once, which can take minutes", what)
        if self._migrating is not None:
            self._migrating(what, MIGRATE_S_PER_MB * mb * (len(MIGRATIONS) - version))

    def begin(self, record: DecisionRecord) -> int:
        """Insert the accepted turn as ``pending``; returns its decision id."""
        self.write_unwritten()
        row = record.row()
        for column in JSON_COLUMNS:
            if column in row:
                row[column] = json.dumps(row[column], separators=(",", ":"), default=str)
        row.update(created=time.time(), outcome="pending", explored=int(record.explored))
        if record.cost_usd is not None:
            row["cost_estimated"] = 1
        with self._writing("recording the turn"):
            decision_id = self.db.table("decisions").insert(row).last_pk
        assert decision_id is not None
        return int(decision_id)

    def finish(self, decision_id: int, outcome: Outcome, held: Held | None = None) -> None:
        """Complete the turn's record, its cost counted today in place of ``held``, what its cloud call was
        held at against the daily cap."""
        row: dict[str, Any] = asdict(outcome)
        for column in ("attachments_sent", "features"):  # None: as the record was begun
            value = row.pop(column)
            if value is not None:
                row[column] = json.dumps(value, separators=(",", ":"))
        if row["confidence"] is not None:
            row["confidence"] = json.dumps(row["confidence"], separators=(",", ":"))
            if outcome.confidence and outcome.confidence.explored:  # the checkpoint's choice explored
                row["explored"] = 1
        row["finished"] = time.time()
        self.write_unwritten()
        answered_by = outcome.backend if outcome.outcome in ANSWERED else None
        counted = self.today.counting(outcome.cost_usd, answered_by, releasing=held)
        try:
            with counted, self._writing("completing the record"):
                self._complete(decision_id, row)
        except StorageError as exc:
            self._keep_unwritten(decision_id, row)
            raise StorageError(
                f"{exc.message}; the answer was given but its record is not committed yet: it is kept and "
                "written as soon as the decision log can be written again",
                code="record_not_committed",
            ) from None

    def _complete(self, decision_id: int, row: dict[str, Any]) -> None:
        """Write a completion (within a transaction): the record, and the openings of a private answer."""
        self.db.table("decisions").update(decision_id, {k: v for k, v in row.items() if k != "private_openings"})
        openings = [{"digest": digest} for digest in row["private_openings"]]
        if openings:
            self.db.table("private_openings").insert_all(openings, ignore=True)

    def _keep_unwritten(self, decision_id: int, row: dict[str, Any]) -> None:
        with self._lock:
            self._unwritten[decision_id] = row
            if len(self._unwritten) > MAX_UNWRITTEN:
                lost = next(iter(self._unwritten))
                del self._unwritten[lost]
                log.error("decision %d: its completion could not be written and is given up (too many held)", lost)

    def write_unwritten(self) -> None:
        """Write the completions a full disk held back; they stay held if it is still full."""
        if not self._unwritten:
            return
        with self._lock:
            held = dict(self._unwritten)
        try:
            with self._writing("completing held-back records"):
                for decision_id, row in held.items():
                    self._complete(decision_id, row)
        except StorageError:
            return
        with self._lock:
            for decision_id in held:
                self._unwritten.pop(decision_id, None)
        log.info("decision log %s: completed %d held-back record(s) %s", self.path, len(held), sorted(held))

    def label(self, decision_id: int, satisfied: bool, source: str) -> LabelTarget:
        """Store a satisfaction label once; returns what the learner trains on."""
        self.write_unwritten()
        with self._writing("storing the label", LABEL_WAIT_S):
            rows = list(self.db.query("SELECT * FROM decisions WHERE id = ?", [decision_id]))
            if not rows:
                raise UnknownDecision(f"no decision with id {decision_id}")
            if rows[0]["satisfied"] is not None:  # the label has trained the router: which one stands, and by whom
                given = f"{'good' if rows[0]['satisfied'] else 'bad'} (by {rows[0]['label_source']})"
                raise UnknownDecision(
                    f"decision {decision_id} is already labelled {given}; a label is final", code="already_labelled"
                )
            if decision_id in self._unwritten:  # answered: write_unwritten above could not complete its record
                raise StorageError(
                    f"decision {decision_id} was answered, but its record is held back until the decision log "
                    "can be written again; label it then",
                    code=self._failing.code if self._failing else "storage",
                )
            if rows[0]["outcome"] == "pending":
                raise UnknownDecision(
                    f"decision {decision_id} is still running; label it once it has answered", code="not_finished"
                )
            if rows[0]["outcome"] not in ANSWERED:  # cut by a cancel or a stop, failed: nothing whole to grade
                raise UnknownDecision(
                    f"decision {decision_id} ended without an answer ({rows[0]['outcome']}): there is nothing to label",
                    code="not_answered",
                )
            self.db.table("decisions").update(
                decision_id, {"satisfied": int(satisfied), "label_source": source, "labelled": time.time()}
            )
        return _label_target(_decoded(rows[0]))

    def labels_of(self, decision_ids: Iterable[int]) -> list[tuple[LabelTarget, bool]]:
        """The labels the log holds for these decisions, each with what ``label`` returned for it: what a
        learner whose saved state still waits on them has not learned (a daemon killed between the two)."""
        ids = sorted(set(decision_ids))
        rows: list[dict[str, Any]] = []
        with self._reading("reading labels") as conn:
            for start in range(0, len(ids), 250):  # within SQLite's bound on a statement's parameters
                chunk = ids[start : start + 250]
                sql = f"SELECT * FROM decisions WHERE satisfied IS NOT NULL AND id IN ({', '.join('?' * len(chunk))})"
                rows.extend(dict(row) for row in conn.execute(sql, chunk))
        return [(_label_target(_decoded(row)), bool(row["satisfied"])) for row in rows]

    def judged(self, decision_id: int, judged: JudgedAnswer, cloud_usd: float) -> None:
        """Keep a local answer's confidence before its turn goes on to the cloud (an escalation), and what
        that call may cost (``cloud_usd``, as ``DecisionRecord.cost_usd``): a daemon killed meanwhile leaves
        the turn ``interrupted`` with the confidence it was escalated on, and the call counted."""
        row: dict[str, Any] = {
            "confidence": json.dumps(asdict(judged), separators=(",", ":")),
            "cost_usd": cloud_usd,
            "cost_estimated": 1,
        }
        if judged.explored:
            row["explored"] = 1
        with self._writing("keeping the local answer's confidence"):
            self.db.table("decisions").update(decision_id, row)

    def private_answers(self, digests: Sequence[str]) -> set[str]:
        """Which of these answer digests (daemon/answer_digests.py) are of answers made from private material:
        in the log, or in completions a full disk still holds back."""
        unique = sorted(set(digests))
        with self._lock:
            held = {
                d for row in self._unwritten.values() for d in (row.get("private_answer"), *row["private_openings"])
            }
        found = held.intersection(unique)
        with self._reading("looking up private answers") as conn:
            for start in range(0, len(unique), 250):  # within SQLite's bound on a statement's parameters
                chunk = unique[start : start + 250]
                marks = ", ".join("?" * len(chunk))
                sql = (
                    f"SELECT private_answer FROM decisions WHERE private_answer IN ({marks}) "
                    f"UNION SELECT digest FROM private_openings WHERE digest IN ({marks})"
                )
                found.update(row[0] for row in conn.execute(sql, chunk * 2))
        return found

    def shadow(self, decision_id: int, result: ShadowResult) -> None:
        with self._writing("recording a shadow answer"):
            self.db.table("decisions").update(decision_id, {"shadow": json.dumps(asdict(result))})

    def settled_since(self, first: int) -> list[tuple[int, str, float]]:
        """The answered routed turns from decision ``first`` on, as their settling took them: (decision, the
        model that answered, the prediction the queue settled with)."""
        sql = "SELECT id, model, s_settled FROM decisions WHERE id >= ? AND s_settled IS NOT NULL ORDER BY id"
        with self._reading("reading settled turns") as conn:
            return [(int(i), str(model), float(s)) for i, model, s in conn.execute(sql, [first])]

    def newest(self) -> int:
        """The newest decision's id (0 in an empty log)."""
        with self._reading("finding the newest decision") as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM decisions").fetchone()[0])

    def identity(self) -> str | None:
        """The log's identity (records_schema's migration 13): the same in its backups, another in a new log;
        None if another program emptied its table."""
        with self._reading("reading the log's identity") as conn:
            row = conn.execute("SELECT identity FROM log_identity LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    def local_labels(self) -> tuple[int, int]:
        """Labels the local model got without the user: (shadow answers, escalated answers), as recorded. An
        escalated answer whose cloud answer had no words to grade it against has none (daemon/shadow.py)."""
        sql = "SELECT (SELECT COUNT(*) FROM decisions WHERE {}), (SELECT COUNT(*) FROM decisions WHERE {})"
        with self._reading("counting local labels") as conn:
            shadows, escalated = conn.execute(sql.format(SHADOWED, ESCALATION_LABELLED)).fetchone()
        return int(shadows), int(escalated)

    def hold_cost(self, decision_id: int, usd: float, held: Held | None = None) -> CostHold:
        """Count what a call for a turn that has ended may cost before it is made, in the turn's cost and
        today's spend, in place of ``held`` (what the cap held of it since it was checked); ``add_cost``
        replaces it with what the call did cost. Today's spend counts it even when the log cannot be written
        (the hold says why its row does not)."""
        error = None
        with self.today.recording():
            try:
                with self._writing("holding what a call may cost"):
                    self._add_to_row(decision_id, usd)
            except StorageError as exc:
                error = exc.message
            finally:  # counted, committed or not
                counted = self.today.count(usd, releasing=held)
        return CostHold(usd, error, counted)

    def add_cost(self, decision_id: int, usd: float, hold: CostHold | None = None) -> None:
        """Money spent on a turn after it ended (grading it with the judge), in place of the ``hold`` counted
        before the call: counted towards today's total even when the log cannot be written, as the daily cap
        must see every dollar spent (a row that cannot be corrected keeps the hold, the most it may cost), and
        into the finished turns' sums (no scrape reads between the write and that), which never held it."""
        in_row = hold.usd if hold is not None and hold.error is None else 0.0
        with self.finished.lock, self.today.counting(usd, replacing=None if hold is None else hold.counted):
            with self._writing("adding cost"):
                self._add_to_row(decision_id, usd - in_row)
                where = self._conn.execute(  # not UPDATE ... RETURNING: SQLite 3.35 (Ubuntu 20.04 has 3.31)
                    "SELECT COALESCE(backend, location), outcome FROM decisions WHERE id = ?", [decision_id]
                ).fetchone()
            self.finished.add_cost(decision_id, None if where is None else (where[0], where[1]), usd)

    def _add_to_row(self, decision_id: int, usd: float) -> None:
        self._conn.execute("UPDATE decisions SET cost_usd = COALESCE(cost_usd, 0) + ? WHERE id = ?", [usd, decision_id])

    def recent(self, query: RecordQuery) -> list[dict[str, Any]]:
        """The newest records ``query`` matches, read on the reading connection (never the writer's: a writer's
        COMMIT on another thread inside a read's savepoint released it, and a write waiting for SQLite's lock
        would hold the read)."""
        where, params = _matching(query)
        with self._reading("reading recent records") as conn:
            rows = [dict(row) for row in conn.execute(self._recent_sql.format(where), [*params, query.limit])]
        return [_decoded(row) for row in rows]

    def spent_today(self) -> float:
        """Money spent since local midnight (status, /metrics)."""
        return self.today.read().usd

    def committed_today(self) -> float:
        """Money spent since local midnight and what the cloud calls decided on may cost yet: what every turn's
        decision and the judge count against the daily cap (``DailyTally.committed``)."""
        return self.today.committed()

    def answered_today(self) -> dict[str, int]:
        """Turns answered since local midnight, and how many the cloud answered (`locod status`'s cloud
        share: what the router did today, beside today's spend)."""
        today = self.today.read()
        return {"turns": today.turns, "cloud": today.cloud}

    def close(self) -> None:
        self.write_unwritten()
        if self._unwritten:
            log.error(
                "decision log %s: %d completed turn(s) could not be written (%s); the next start marks them "
                "interrupted",
                self.path,
                len(self._unwritten),
                sorted(self._unwritten),
            )
        with self._read_lock:  # first: the writer's close, the last connection's, checkpoints the WAL away
            self._reader.close()
        with self._lock:
            self._conn.close()
            self._files.close()


def _label_target(row: dict[str, Any]) -> LabelTarget:
    """What the learner trains a labelled record's label on."""
    judged = JudgedAnswer.from_json(row.get("confidence"))
    return LabelTarget(int(row["id"]), row["model"], Routing.from_row(row), judged)


def _open_writer(path: Path) -> sqlite3.Connection:
    """The writing connection, shared by the daemon's threads: WAL, and every commit durable
    (``synchronous=FULL``). A log a newer locod migrated is refused before anything is written to it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_WAIT_S)
        conn.text_factory = _readable_text  # a label on a row with bytes that are not UTF-8 read them
        _refuse_newer(path, conn)  # before the journal mode, the first write to the file
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
    except (OSError, sqlite3.Error) as exc:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):  # said as a turn's write says it
            raise _write_failed(path, "opening it", exc) from None
        odd = _not_regular(path)
        if odd is not None:
            raise StorageError(f"cannot open the decision log {path}: {odd}") from None
        if _disk_full(path.parent):
            raise StorageError(
                f"cannot open the decision log {path}: the disk it is on is full; free space there and start "
                f"again (SQLite: {exc})",
                code="disk_full",
            ) from None
        raise StorageError(f"cannot open the decision log {path}: {exc}") from None
    return conn


def _not_regular(path: Path) -> str | None:
    """What to say when the log, its -wal or its -shm is not a regular file (a FIFO, socket or directory put
    there), for which SQLite says only "disk I/O error"; None when each is one, or not there."""
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            regular = stat.S_ISREG(file.lstat().st_mode)
        except OSError:
            continue
        if not regular:
            return f"{file} is not a regular file (a FIFO, socket or directory put there); remove it and start again"
    return None


def _at_size_limit(path: Path) -> str | None:
    """What to say when the log or its -wal has grown to the daemon's file size limit (``ulimit -f`` in the
    shell that started it, systemd's ``LimitFSIZE=``), for which SQLite says only "disk I/O error" at every
    write from then on; None when neither has, or there is no limit."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    for file in (path, Path(f"{path}-wal")):
        with suppress(OSError):
            if file.stat().st_size > limit - MAX_PAGE_BYTES:
                return (
                    f"{file} has grown to the daemon's file size limit ({limit} bytes: `ulimit -f`, systemd's "
                    "LimitFSIZE=); start the daemon again without that limit"
                )
    return None


def _disk_full(directory: Path) -> bool:
    """Whether the file system holding ``directory`` has less than MIN_FREE_BYTES left for this user. SQLite
    says only "disk I/O error" when a full disk leaves no room for the log's -wal and -shm files at start."""
    try:
        info = os.statvfs(directory)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < MIN_FREE_BYTES


def _open_reader(path: Path) -> sqlite3.Connection:
    """The reading connection (status, the `decisions` op, /metrics): in WAL mode a reader never waits for a
    writer, so a write waiting on another process's lock (a sqlite3 shell left in a transaction) does not
    stall the serving loop, which answers status and decisions itself."""
    try:
        reader = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the decision log {path} for reading: {exc}") from None
    reader.row_factory, reader.text_factory = sqlite3.Row, _readable_text
    return reader


def _recent_query(columns: Iterable[str]) -> str:
    """The `decisions` op's query, its WHERE left as ``{}``: a logged prompt's head only (``prompt_chars``
    says how long it was), as a reply of a thousand megabyte prompts would hold the loop and the memory."""
    shown = (f"substr({c}, 1, {PROMPT_SHOWN}) AS {c}" if c == "prompt" else c for c in columns)
    return f"SELECT {', '.join(shown)} FROM decisions {{}} ORDER BY id DESC LIMIT ?"


def _refuse_newer(path: Path, conn: sqlite3.Connection) -> None:
    """Refuse a log a newer locod migrated (after a downgrade): its columns mean what this code cannot know,
    and rows written here would lack what that version requires of them."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        conn.close()
        raise StorageError(
            f"decision log {path} has schema version {version}, newer than this locod {__version__} knows "
            f"({len(MIGRATIONS)}): a newer locod wrote it. Run that version again, or move the file aside (or "
            "restore a backup made with this version) and start again; nothing was written to it",
            code="db_too_new",
        )


def _write_failed(path: Path, what: str, exc: sqlite3.Error) -> StorageError:
    """The error a failed write raises: one that says so when another process holds the database's lock."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StorageError(
            f"decision log {path}: {what} failed: another process holds a write lock on it (a sqlite3 shell "
            "left in a transaction?); nothing was written, try again once it lets go",
            code="db_locked",
        )
    odd = (_not_regular(path) or _at_size_limit(path)) if "disk I/O error" in str(exc) else None
    if odd is not None:
        return StorageError(f"decision log {path}: {what} failed: {odd}")
    if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(exc):
        return StorageError(
            f"decision log {path}: {what} failed: the disk it is on is full; free space there and try again "
            "(the daemon needs no restart; docs/operations.md, When the disk fills)",
            code="disk_full",
        )
    return StorageError(f"decision log {path}: {what} failed: {exc}")


def _readable_text(raw: bytes) -> str:
    """A TEXT value as read: bytes that are not UTF-8 (written by another program, or a damaged page) read as
    ``\\xff`` escapes. Decoded strictly, one such value failed every read it was in: `locod decisions`,
    status, the report and training, until the row was found and deleted by hand."""
    return raw.decode("utf-8", "backslashreplace")


def read_rows(path: Path, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Rows of the decision log at ``path``, read-only: the daemon may be running, or stopped."""
    return list(iter_rows(path, sql, params))


def iter_rows(path: Path, sql: str, params: Sequence[Any] = ()) -> Iterator[sqlite3.Row]:
    """``read_rows`` one row at a time, for a query over a long period (a year is a million rows; held in a
    list, a report took hundreds of megabytes). Exhaust it soon: it holds a read transaction, which stops
    the daemon's checkpoints meanwhile."""
    _check_readable(path)
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            conn.row_factory, conn.text_factory = sqlite3.Row, _readable_text
            try:
                yield from conn.execute(sql, params)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the decision log {path}: {exc}{_schema_note(conn)}") from None
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the decision log {path}: {exc}") from None


def _check_readable(path: Path) -> None:
    """Refuse a read of a log that is not there, or that this user may not reach, by name: on a shared box the
    system service's /var/lib/locod is its user's alone, and another user's `locod decisions` ended in a bare
    "Permission denied" (or, where Python answers False, in "the daemon has not answered a turn yet")."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except PermissionError:
        closed, owner = closed_to_this_user(path)
        raise StorageError(
            f"cannot read the decision log {path}: it is not open to this user ({closed}); run the command as "
            f"{owner} (`sudo -u {owner} locod ...`)"
        ) from None
    except FileNotFoundError:
        raise StorageError(f"no decision log at {path}: the daemon has not answered a turn yet", code=NO_LOG) from None
    except OSError:
        regular = False
    if not regular:
        raise StorageError(f"no decision log at {path}: the daemon has not answered a turn yet")


def _schema_note(conn: sqlite3.Connection) -> str:
    """Why a read of a log of another schema version may fail, to add to its error ("" when it is this
    code's): a log not migrated yet (the daemon not restarted since an upgrade), or one a newer locod wrote."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version < len(MIGRATIONS):
        return (
            f" (its schema is version {version}, older than this locod's {len(MIGRATIONS)}: start the daemon "
            "once, which migrates it, then read it again)"
        )
    if version > len(MIGRATIONS):
        return (
            f" (its schema is version {version}, newer than this locod {__version__} knows, {len(MIGRATIONS)}: "
            "a newer locod wrote it; read it with that version)"
        )
    return ""


# What training reads of a labelled turn (``labelled_turns``): not its prompt, up to a megabyte a row.
TRAINED_ON = (
    "session, turn, backend, satisfied, latency_total_ms, cost_usd, energy_j, attachments_offered, telemetry, "
    "task, prompt_chars"
)


def labelled_turns(path: Path) -> list[LoggedTurn]:
    """The labelled, answered turns of a decision log, oldest first (an escalated turn as the cloud answer it
    ended in, its latency and energy including the local attempt: what taking that way cost)."""
    where = f"satisfied IS NOT NULL AND {WAS_ANSWERED}"
    turns, unread = [], 0
    for row in iter_rows(path, f"SELECT {TRAINED_ON} FROM decisions WHERE {where} ORDER BY id"):
        try:
            turns.append(_logged_turn(row))
        except (ValueError, TypeError, AttributeError):  # another program's row: text in a number column, ...
            unread += 1
    if unread:
        log.warning(
            "%d labelled turns of %s are not as locod writes them (another program's rows?): left out", unread, path
        )
    return turns


def _logged_turn(row: sqlite3.Row) -> LoggedTurn:
    return LoggedTurn(
        session=row["session"],
        turn=row["turn"],
        backend=row["backend"],
        satisfied=bool(row["satisfied"]),
        latency_total_ms=float(row["latency_total_ms"] or 0.0),
        cost_usd=float(row["cost_usd"] or 0.0),
        energy_j=float(row["energy_j"] or 0.0),
        observed=logged_observation(
            row["task"],
            int(row["prompt_chars"]),
            json.loads(row["attachments_offered"] or "[]"),
            json.loads(row["telemetry"] or "{}"),
        ),
    )


def read_recent(path: Path, query: RecordQuery) -> list[dict[str, Any]]:
    """The newest records ``query`` matches, without a daemon: `locod decisions` while it is stopped."""
    where, params = _matching(query)
    rows = read_rows(path, f"SELECT * FROM decisions {where} ORDER BY id DESC LIMIT ?", [*params, query.limit])
    return [_decoded(dict(row)) for row in rows]


def _matching(query: RecordQuery) -> tuple[str, list[Any]]:
    """The WHERE clause for the records ``query`` asks for. ``of`` is a decision id (what ``x-locod-decision``
    and ``locod feedback`` name) when it is a number SQLite's integers hold (one past them raised
    OverflowError), else a request id (an HTTP completion's ``id``); the location is where the turn ran in the
    end, as the table of ``locod decisions`` shows it; ``before`` pages back, newest first, from an id."""
    conditions: list[tuple[str, Any]] = []
    if query.of is not None and query.of.isdecimal() and query.of.isascii() and int(query.of) < 1 << 63:
        conditions.append(("id = ?", int(query.of)))
    elif query.of is not None:
        conditions.append(("request_id = ?", query.of))
    for condition, value in (
        ("session = ?", query.session),
        ("COALESCE(backend, location) = ?", query.location),
        ("outcome = ?", query.outcome),
        ("created >= ?", query.since),
        ("id < ?", query.before),
    ):
        if value is not None:
            conditions.append((condition, value))
    if not conditions:
        return "", []
    return "WHERE " + " AND ".join(c for c, _ in conditions), [v for _, v in conditions]


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for column in JSON_COLUMNS:
        if isinstance(row.get(column), str):
            with suppress(ValueError):  # not JSON (another program wrote it): read as the text it is, not
                row[column] = json.loads(row[column])  # a failure of every read the row is in
    return row
