"""Attack 28: the daemon's persistent state, as other programs, damaged disks and older or newer versions leave
it. Real daemon, real SQLite files, real prior files.

A predictor prior in the user's priors folder with a few bytes damaged (an SD card, a copy cut short) raised
zlib's, zipfile's or numpy's own exception types, which the loader did not expect: every start stopped with a
traceback. A decision log whose tables another program changed (a column dropped with sqlite3 at the
current schema version) was opened as if whole: each turn was accepted and answered, then its completion
failed ("no such column"), and the next start called every one of them interrupted; a file whose table
``decisions`` was another program's was refused as "migrate failed: table decisions already exists". JSON
nested thousands deep in the HTTP conversations file stopped the start with a RecursionError traceback, and
in a parked KV state's header failed its session's next turn as ``internal``. A user's prior with a weight
beyond what a MESS+ state may hold was taken at warm start and saved into the state, which every later start
then set aside as damaged (its queue, labels and every model's learning with it). A start while another
process held an exclusive lock on the log said only "database is locked". A FIFO at ``locod.lock`` held the
start for good, without a word (the lock file was opened to write, which waits for a reader); one at
``messplus.tmp`` held the first save of the MESS+ state, and with its lock every later turn, status and the stop.
A FIFO at ``locod.db`` or ``locod.db-wal`` was said as "disk I/O error".
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import urllib.request
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from locod.daemon.kvpark import HEADER, MAGIC
from locod.daemon.records_schema import MIGRATIONS
from locod.policy.confidence import identity
from locod.policy.messplus import DIM
from locod.policy.warmstart import PRIORS, Prior, file_sha256, save_prior

from .conftest import free_port, start_daemon, wait_for

KNOWN = len(MIGRATIONS)


def _damaged(raw: bytes, seed: int) -> bytes:
    """``raw``, an npz, with four bytes changed so that reading its arrays fails in zlib (seeded: always the same)."""
    rng = random.Random(seed)
    while True:
        damaged = bytearray(raw)
        for _ in range(4):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            with np.load(BytesIO(bytes(damaged)), allow_pickle=False) as data:
                for key in data.files:
                    data[key]
        except zlib.error:
            return bytes(damaged)
        except Exception:  # damaged some other way: look further
            continue


def test_a_damaged_user_prior_is_left_out_by_name_and_the_daemon_starts(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: damage a few bytes of a prior in the user's priors folder (its deflate stream), and put beside it
    one whose ``gguf_size`` is an array. The start failed with zlib's traceback (TypeError for the other): the
    loader caught only OSError, ValueError, KeyError and BadZipFile. Now each is named and left out, the model
    starts from the shipped prior, and the daemon answers."""
    priors = tmp_path / "d" / "state" / "priors"
    priors.mkdir(parents=True)
    (priors / "damaged.npz").write_bytes(_damaged(next(PRIORS.glob("*.npz")).read_bytes(), seed=28))
    np.savez(
        priors / "odd-shape.npz",
        sha256=np.array("0" * 64),
        gguf_size=np.array([1, 2]),
        weights=np.zeros(3),
        confidence=np.zeros(3),
        source=np.array("mine"),
    )

    handle = daemon_factory()
    said = handle.log()
    assert f"predictor prior {priors / 'damaged.npz'} is unreadable, left out: " in said, said
    assert "not a prior file, or a damaged one (Error -3 while decompressing data" in said
    assert f"predictor prior {priors / 'odd-shape.npz'} is unreadable, left out: " in said
    assert "starts from the prior fitted on" in said
    assert handle.client().ask("Hi", max_tokens=2).done.outcome == "ok"


def _log_at_this_version(path: Path, drop: str | None = None) -> None:
    """A decision log at this code's schema, in WAL mode as the daemon leaves it, with one turn left
    ``pending``; ``drop``: a column another program dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    db = sqlite_utils.Database(conn)
    for number, step in enumerate(MIGRATIONS, start=1):
        step(db)
        conn.execute(f"PRAGMA user_version = {number}")
    db["decisions"].insert(
        {"created": 1.7e9, "session": "s", "turn": 1, "location": "local", "model": "m", "outcome": "pending"}
    )
    if drop:
        conn.execute(f"ALTER TABLE decisions DROP COLUMN {drop}")
    conn.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_log_whose_columns_another_program_dropped_is_refused_at_start(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: drop a column of the decision log with sqlite3 (here ``s_settled``), its ``user_version`` left at
    this code's. The daemon started, accepted and answered each turn, then failed to complete its record ("no
    such column"): the answer given, the record held in memory, and the next start called the turn
    interrupted. Now the start is refused naming the file and the column, and nothing is written to it (its
    pending turn stays pending)."""
    db_path = tmp_path / "d" / "state" / "locod.db"
    _log_at_this_version(db_path, drop="s_settled")
    before = _digest(db_path)

    handle = daemon_factory(wait=False)
    assert handle.proc.wait(120) == 4
    said = handle.log()
    assert f"decision log {db_path} is at schema version {KNOWN} but lacks column decisions.s_settled: " in said
    assert "restore a backup (docs/operations.md, Backing up and restoring), or move it aside" in said
    assert "Traceback" not in said
    assert _digest(db_path) == before
    assert [row["outcome"] for row in handle.rows()] == ["pending"]


def test_a_log_rebuilt_without_its_key_is_refused_at_start(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: prune the log the way SQL often does, ``CREATE TABLE kept AS SELECT * FROM decisions WHERE ...``,
    then drop ``decisions`` and rename ``kept`` to it: every column is there, but ``id`` is no longer the
    table's key. The daemon started; a new turn's decision id was its rowid, the id of a turn kept by the prune,
    so the client's label changed that older record while the new one stayed without an id. Now the start is
    refused naming the key, and nothing is written."""
    db_path = tmp_path / "d" / "state" / "locod.db"
    _log_at_this_version(db_path)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE decisions SET outcome = 'ok'")
        conn.execute(
            "INSERT INTO decisions (created, session, turn, location, model, outcome) SELECT created, "
            "session, turn + 1, location, model, outcome FROM decisions"
        )
        conn.execute("CREATE TABLE kept AS SELECT * FROM decisions WHERE id > 1")
        conn.execute("DROP TABLE decisions")
        conn.execute("ALTER TABLE kept RENAME TO decisions")
    conn.close()
    before = _digest(db_path)

    handle = daemon_factory(wait=False)
    assert handle.proc.wait(120) == 4
    said = handle.log()
    assert f"decision log {db_path} is at schema version {KNOWN} but lacks decisions.id as its INTEGER PRIMARY KEY" in (
        said
    )
    assert _digest(db_path) == before
    assert [row["id"] for row in handle.rows()] == [2]


def test_a_log_whose_decisions_table_is_another_programs_is_refused_by_name(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Attack: a ``locod.db`` of another program, with a table ``decisions`` of its own and no schema version.
    Taken for a log rebuilt from a dump at version 0, it failed with "migrate failed: table decisions already
    exists". Now it is named as not locod's, and the file is left as it was."""
    db_path = tmp_path / "d" / "state" / "locod.db"
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY, verdict TEXT)")
        conn.execute("INSERT INTO decisions (verdict) VALUES ('theirs')")
    conn.close()

    handle = daemon_factory(wait=False)
    assert handle.proc.wait(120) == 4
    said = handle.log()
    assert f"decision log {db_path} holds a table decisions that is not locod's" in said, said
    assert "already exists" not in said
    assert handle.rows() == [{"id": 1, "verdict": "theirs"}]


def test_a_whole_log_at_this_version_still_starts(daemon_factory: Any, tmp_path: Path) -> None:
    """The check above passes a log with every column: its pending turn is marked interrupted as before."""
    _log_at_this_version(tmp_path / "d" / "state" / "locod.db")
    handle = daemon_factory()
    assert handle.client().ask("Hi", max_tokens=2).done.outcome == "ok"
    assert [row["outcome"] for row in handle.rows()] == ["interrupted", "ok"]


DEEP = b"[" * 100_000  # JSON nested past Python's recursion limit: json.loads raises RecursionError


def test_a_conversations_file_nested_thousands_deep_is_ignored_by_name(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: ``conversations.json`` (the HTTP door's map, kept with parked dialogue states) holding JSON
    nested 100,000 deep. The start failed with json's RecursionError traceback; now the file is ignored with
    one line naming it, and the door answers."""
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True)
    (state / "conversations.json").write_bytes(DEEP)
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}, "local": {"cache_disk_mb": 8}})
    assert f"ignored {state / 'conversations.json'}, not the HTTP conversations locod keeps" in handle.log()
    body = {"model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert json.load(response)["choices"][0]["message"]["content"] is not None


def test_a_parked_state_whose_header_is_nested_thousands_deep_is_ignored(tmp_path: Path, models_dir: Path) -> None:
    """Attack: a parked KV state (``kvcache/*.kv``) with locod's magic and a JSON header nested 100,000 deep.
    Its session's next turn failed with ``internal error: RecursionError``; now the file is ignored as an
    unreadable header and the turn is answered from its prompt."""
    config = {"local": {"cache_disk_mb": 8}}
    home = tmp_path / "d"
    first = start_daemon(home, models_dir, config)
    try:
        assert first.client().ask("Hi there", max_tokens=2, session="a").done.outcome == "ok"
    finally:
        first.stop()
    parked = list((home / "state" / "kvcache").glob("*.kv"))
    assert parked, "the stop parked no dialogue state"
    for path in parked:
        path.write_bytes(HEADER.pack(MAGIC, len(DEEP)) + DEEP)

    again = start_daemon(home, models_dir, config)
    try:
        assert again.client().ask("And again", max_tokens=2, session="a").done.outcome == "ok"
        assert f"ignoring parked KV state {parked[0].name}: unreadable header" in again.log()
    finally:
        again.stop()


def test_a_prior_with_weights_a_state_may_not_hold_is_left_out_and_the_state_kept(
    tmp_path: Path, models_dir: Path, model_path: Path
) -> None:
    """Attack: a prior in the user's priors folder for the model's GGUF, with one weight of 20,000 (finite, the
    right shapes; a MESS+ state refuses weights past 10,000 as damaged). The model's predictor started from it
    and the state was saved with it, so each start after set the whole state aside (``messplus.npz.bad-*``, one
    more per restart) and started over from the same prior. Now the prior is refused by name, and the state
    the daemon saves loads again at the next start."""
    home = tmp_path / "d"
    weights = np.zeros(DIM)
    weights[3] = 2e4
    outlier = Prior(file_sha256(model_path), model_path.stat().st_size, weights, identity(), "an outlier")
    save_prior(outlier, home / "state" / "priors")

    first = start_daemon(home, models_dir)
    try:
        assert first.client().ask("Hi", max_tokens=2).done.outcome == "ok"
        assert (
            f"predictor prior {home / 'state' / 'priors' / outlier.sha256}.npz for {model_path.name} is unusable"
            in (first.log())
        )
        assert "fitted on an outlier" not in first.log()
    finally:
        first.stop()
    again = start_daemon(home, models_dir)
    try:
        assert "MESS+ state" not in again.log(), again.log()
        assert not list((home / "state").glob("messplus.npz.bad-*"))
        assert again.client().status()["routing"]["turns"] == 1
    finally:
        again.stop()


HOLD_EXCLUSIVE = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=1)
conn.execute("PRAGMA locking_mode=EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("SELECT COUNT(*) FROM decisions").fetchone()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_start_while_another_process_holds_the_log_exclusively_says_so(tmp_path: Path, models_dir: Path) -> None:
    """Attack: between two runs of the daemon, another program takes the log in exclusive locking mode (a
    sqlite3 shell after ``PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE;``), and the daemon is started. It
    waited out its busy timeout and exited with "cannot open the decision log ...: database is locked"; now it
    says another process holds the lock and what to do, as a turn's refused write does (``db_locked``)."""
    home = tmp_path / "d"
    first = start_daemon(home, models_dir)
    first.stop()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_EXCLUSIVE, str(first.db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        again = start_daemon(home, models_dir, wait=False)
        assert again.proc.wait(120) == 4
        said = again.log().split("stopped after")[-1]
        assert f"decision log {first.db_path}: opening it failed: another process holds a write lock on it" in said
        assert "try again once it lets go" in said
    finally:
        holder.kill()
        holder.wait()


def test_a_fifo_or_a_directory_in_place_of_the_lock_file_is_refused_by_name(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Attack: a FIFO at ``<state dir>/locod.lock``. The daemon opened it to write, which waits for a reader:
    the start hung for good with nothing in its log (systemd's start timeout, then a restart, hung again).
    Now it is refused at once, naming the file (exit 4); so is a directory in the runtime directory's place."""
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True, mode=0o700)
    os.mkfifo(state / "locod.lock")
    handle = daemon_factory(wait=False)
    assert handle.proc.wait(60) == 4
    assert f"{state / 'locod.lock'} is not a regular file (a FIFO, socket, device or directory put there)" in (
        handle.log()
    )

    run = tmp_path / "e" / "run"
    (run / "locod.lock").mkdir(parents=True)
    run.chmod(0o700)
    other = daemon_factory(name="e", wait=False)
    assert other.proc.wait(60) == 4
    assert f"{run / 'locod.lock'} is not a regular file" in other.log()


def test_a_fifo_at_the_state_files_temp_name_holds_nothing(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: a FIFO at ``<state dir>/messplus.tmp``, the name the MESS+ state is written under before its
    rename. The first routed turn's save opened it to write and waited for a reader for good, holding the
    learner's lock: every later turn and ``status`` waited behind it, and SIGTERM could not stop the daemon.
    The temp file is now made anew (what is there removed first): every turn is answered and the state saved."""
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True, mode=0o700)
    os.mkfifo(state / "messplus.tmp")
    handle = daemon_factory()
    client = handle.client(turn_timeout_s=120)
    assert [client.ask(f"Hi {i}", max_tokens=2).done.outcome for i in range(3)] == ["ok"] * 3
    wait_for(lambda: client.status()["routing"]["turns"] == 3, 60, "the last turn to settle")  # after `done`
    assert handle.stop() == 0
    assert (state / "messplus.npz").is_file() and not (state / "messplus.tmp").exists()


def test_a_fifo_in_place_of_the_log_or_its_wal_is_named(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: a FIFO at ``locod.db``, and (beside a good log) one at ``locod.db-wal``. SQLite says "disk I/O
    error", which was all the daemon said; now it names the file that is not a regular file (exit 4)."""
    for name, odd in (("a", "locod.db"), ("b", "locod.db-wal")):
        state = tmp_path / name / "state"
        state.mkdir(parents=True, mode=0o700)
        if odd != "locod.db":
            with sqlite3.connect(state / "locod.db") as conn:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.close()
        os.mkfifo(state / odd)
        handle = daemon_factory(name=name, wait=False)
        assert handle.proc.wait(60) == 4
        said = handle.log()
        assert f"{state / odd} is not a regular file (a FIFO, socket or directory put there); remove it" in said, said
