"""Round eleven of attacks on a running daemon: version skew, upgrades and interrupted state changes. Files
outlive the code that wrote them, users go back a version, and a daemon keeps its code while the installed
one changes under it; each test is one way in that broke or could, and now holds. Real daemon, real SQLite
files, real policy and state files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlite_utils
import zmq

from locod import __version__
from locod.build import code_digest
from locod.daemon.records import MIGRATIONS, read_rows
from locod.errors import StorageError
from locod.policy.confidence import identity
from locod.policy.messplus import DIM
from locod.policy.onnx_policy import DEFAULT_POLICY
from locod.policy.warmstart import Prior, file_sha256, save_prior

from .conftest import REPO, locod_command, start_daemon, wait_for
from .test_daemon import previous_release

KNOWN = len(MIGRATIONS)


def _old_log(path: Path, version: int, rows: int, outcome: str = "ok") -> None:
    """A decision log as locod at schema ``version`` left it (its first migrations only), with ``rows`` turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    for number, step in enumerate(MIGRATIONS[:version], start=1):
        step(db)
        conn.execute(f"PRAGMA user_version = {number}")
    turns = (
        {"created": 1.7e9 + i, "session": f"s{i}", "turn": i, "request_id": f"chatcmpl-{i:016d}", "prompt_chars": 9}
        | {"task": "chat", "location": "local"}
        | {"model": "smollm2-135m-instruct", "outcome": outcome, "reason": "kept from before the upgrade"}
        for i in range(rows)
    )
    db["decisions"].insert_all(turns, batch_size=5000)
    conn.close()


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(decisions)")}


def _columns_at(version: int) -> set[str]:
    """The columns the migrations up to ``version`` make."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for step in MIGRATIONS[:version]:
        step(sqlite_utils.Database(conn))
    return _columns(conn)


def test_a_log_a_newer_locod_migrated_is_refused_by_name_and_not_written(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: go back a version after a newer locod migrated the decision log (schema 11 here). The daemon
    found no migration to run and went on writing rows into a schema it does not know (a column the newer
    version requires left NULL); one of a log it could not read said only "migrate failed: no such column".
    Now it refuses to start, naming the file, both versions and what to do, and the file is as it was: its
    pending turn is not marked interrupted, not even the journal mode is changed. `locod decisions` still
    reads it."""
    db_path = tmp_path / "d" / "state" / "locod.db"
    _old_log(db_path, KNOWN, 2, outcome="pending")
    with sqlite3.connect(db_path) as conn:
        conn.execute("ALTER TABLE decisions ADD COLUMN newer_column TEXT")
        conn.execute(f"PRAGMA user_version = {KNOWN + 1}")
    before = hashlib.sha256(db_path.read_bytes()).hexdigest()

    handle = daemon_factory(wait=False)
    assert handle.proc.wait(120) != 0
    said = handle.log()
    assert f"decision log {db_path} has schema version {KNOWN + 1}, newer than this locod" in said, said
    assert f"knows ({KNOWN}): a newer locod wrote it. Run that version again" in said
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == before
    assert [row["outcome"] for row in handle.rows()] == ["pending", "pending"]

    shown = handle.cli("decisions")
    assert shown.returncode == 0 and "kept from before the upgrade" in shown.stdout, shown.stderr


def test_a_read_that_a_log_of_another_version_fails_says_which_version(tmp_path: Path) -> None:
    """Attack: `locod report` (and the other readers of the file) on a log of another schema: one a newer
    locod reshaped, or one the daemon has not migrated yet (installed, not restarted). The error was SQLite's
    alone ("no such column: backend"); now it says which schema the log has and what to do."""
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY, outcome TEXT)")
        conn.execute(f"PRAGMA user_version = {KNOWN + 4}")
    with pytest.raises(StorageError, match=rf"its schema is version {KNOWN + 4}, newer than this locod .* a newer"):
        read_rows(newer, "SELECT backend FROM decisions")
    older = tmp_path / "older.db"
    _old_log(older, 3, 1)
    with pytest.raises(StorageError, match=rf"version 3, older than this locod's {KNOWN}: start the daemon once"):
        read_rows(older, "SELECT error_code FROM decisions")
    assert [row["outcome"] for row in read_rows(older, "SELECT outcome FROM decisions")] == ["ok"]


def test_an_old_log_killed_mid_migration_is_whole_and_migrated_at_the_next_start(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Attack: SIGKILL the first start after an upgrade while it migrates a large old log (schema 3). A
    migration whose columns were committed without its ``user_version`` would fail every later start with
    "duplicate column". The file is either the old schema or the new one, whole, and the next start migrates
    it with every row kept and answers."""
    db_path = tmp_path / "d" / "state" / "locod.db"
    _old_log(db_path, 3, 150_000)
    wal = db_path.with_name("locod.db-wal")  # frames there: the migration's pages, spilled before its commit
    handle = daemon_factory(wait=False)
    wait_for(lambda: handle.proc.poll() is not None or (wal.exists() and wal.stat().st_size > 0), 120, "the migration")
    handle.proc.send_signal(signal.SIGKILL)
    handle.proc.wait(30)

    with sqlite3.connect(db_path) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        assert version in (3, KNOWN) and _columns(conn) == _columns_at(version)
        assert conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 150_000

    again = daemon_factory(name="d")
    assert again.client().ask("Hi", max_tokens=2).done.outcome == "ok"
    (kept, fresh) = again.rows("SELECT * FROM decisions WHERE id IN (1, 150001) ORDER BY id")
    assert kept["reason"] == "kept from before the upgrade" and kept["error_code"] is None
    assert fresh["outcome"] == "ok"
    assert again.rows("PRAGMA user_version")[0]["user_version"] == KNOWN


def _checkout_with_a_change(tmp_path: Path) -> Path:
    """The package as another checkout (or a `git pull` the daemon has not restarted for) has it: the same
    version, one file changed. Only its Python modules: `locod status` needs no data files."""
    root = tmp_path / "checkout"
    skip = shutil.ignore_patterns("__pycache__", "default", "data", "priors", "*.onnx")
    shutil.copytree(REPO / "api", root / "locod", ignore=skip)
    for package in ("daemon", "policy"):
        shutil.copytree(REPO / package, root / "locod" / package, ignore=skip)
    with (root / "locod" / "daemon" / "turn.py").open("a") as module:
        module.write("# a later commit\n")
    return root


def test_status_says_when_the_daemon_runs_other_code_than_the_command(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: upgrade (git pull in an editable install, or another venv's `locod`) while the daemon runs. It
    keeps its old code, `__version__` stays 0.1.0, and `locod status` showed nothing amiss (nor did `locod
    reload`, which keeps the code). Now the daemon reports a digest of the code it started with and the
    command compares it with its own."""
    handle = daemon_factory()
    status = json.loads(handle.cli("status", "--json").stdout)
    assert status["code"] == code_digest() and len(status["code"]) == 16
    assert "runs other code" not in handle.cli("status").stdout

    env = {**handle.env, "PYTHONPATH": str(_checkout_with_a_change(tmp_path))}
    newer = subprocess.run(
        locod_command("--config", str(handle.config_path), "status"), capture_output=True, text=True, env=env
    )
    assert newer.returncode == 0, newer.stderr
    assert f"the daemon runs other code than this command (code {status['code']}, installed " in newer.stdout
    assert "restart it to run this one" in newer.stdout
    reload = subprocess.run(
        locod_command("--config", str(handle.config_path), "reload"), capture_output=True, text=True, env=env
    )
    assert (
        reload.returncode == 0 and "a reload re-reads the configuration and the policy, not the code" in reload.stderr
    )


def test_status_says_when_the_daemon_predates_the_code_digest(tmp_path: Path, models_dir: Path) -> None:
    """The same, against a daemon of before the digest (this repository's history): its status has no
    ``code``, and its code is older than the command's."""
    handle = start_daemon(tmp_path / "d", models_dir, extra_env={"PYTHONPATH": str(previous_release(tmp_path))})
    try:
        installed = {k: v for k, v in handle.env.items() if k != "PYTHONPATH"}  # the command: this checkout's
        status = subprocess.run(
            locod_command("--config", str(handle.config_path), "status"), capture_output=True, text=True, env=installed
        )
        assert status.returncode == 0, status.stderr
        assert "the daemon (locod 0.1.0) runs code older than this command's (its status has no code" in status.stdout
        assert "restart it to run the installed version" in status.stdout
    finally:
        handle.stop()


def test_a_config_key_an_upgrade_removed_says_what_became_of_it(daemon_factory: Any) -> None:
    """Attack: keep the config file of an older version, which set `daemon.cloud_workers` (removed: it never
    did anything). The daemon refused it as an "unknown key" among thirty known ones, leaving its user to
    guess whether it was renamed; now the error says it was removed and why, and to remove it."""
    handle = daemon_factory({"daemon": {"cloud_workers": 8}}, wait=False)
    assert handle.proc.wait(120) != 0
    assert "key 'daemon.cloud_workers' was removed from locod: it never did anything" in handle.log()
    override = handle.cli("serve", "--set", "daemon.watchdog_stall_s=30")
    assert override.returncode != 0
    assert "override daemon.watchdog_stall_s: key 'daemon.watchdog_stall_s' was removed" in override.stderr
    assert "remove it" in override.stderr


def test_a_policy_and_router_state_a_newer_locod_wrote_are_refused_by_name(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: go back a version with a policy a newer locod trained (observation layout 3) and a router
    state file of its format. The policy was refused as "metadata locod.layout_version is '3', this daemon
    needs '2'", which does not say that it is newer nor what to do; the state was set aside without saying
    that the version that wrote it can read it again. Both now say so, and the daemon serves."""
    import onnx

    model = onnx.load(str(DEFAULT_POLICY))
    for entry in model.metadata_props:
        if entry.key == "locod.layout_version":
            entry.value = "3"
    newer_policy = tmp_path / "newer.onnx"
    onnx.save(model, str(newer_policy))
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True)
    np.savez(state / "messplus.npz", version=np.array(2), dim=np.array(DIM))

    handle = daemon_factory({"routing": {"policy_path": str(newer_policy)}})
    error = handle.client().status()["routing"]["policy_error"]
    assert f"policy file {newer_policy} has observation layout 3, newer than this locod knows (2)" in error
    assert "`locod policy train`" in error
    assert "this locod reads version 1" in handle.log() and "rename it back" in handle.log()
    assert len(list(state.glob("messplus.npz.bad-*"))) == 1
    assert handle.client().ask("Hi", max_tokens=2).done.outcome == "ok"
    assert os.path.exists(state / "locod.db")


def test_a_user_prior_of_another_version_is_named_and_the_shipped_one_used(
    daemon_factory: Any, tmp_path: Path, model_path: Path
) -> None:
    """Attack: a predictor prior the user fitted (scripts/fit_prior.py, kept in the state directory across
    upgrades) outlives the head layout it was fitted for. It matched the GGUF's hash and was taken over the
    shipped prior, then refused by its shape without a word: the model started from nothing. And one file
    there that could not be read (another version's keys) left out every other. Now the unusable file is
    named, and the model starts from the shipped prior."""
    priors = tmp_path / "d" / "state" / "priors"
    other_layout = Prior(file_sha256(model_path), model_path.stat().st_size, np.zeros(DIM + 8), identity(), "mine")
    save_prior(other_layout, priors)
    np.savez(priors / "from-a-newer-locod.npz", sha256=np.array("0" * 64), format=np.array(2))

    handle = daemon_factory()
    said = handle.log()
    assert f"predictor prior {priors}/{other_layout.sha256}.npz for {model_path.name} is unusable" in said, said
    assert "fit it again with scripts/fit_prior.py" in said
    assert f"predictor prior {priors / 'from-a-newer-locod.npz'} is unreadable, left out" in said
    assert "starts from the prior fitted on" in said and "fitted on mine" not in said


def test_a_client_of_another_version_is_told_the_daemons(daemon: Any) -> None:
    """Attack: a client of another protocol version, and one newer than the daemon that sends an option the
    daemon's version does not know (a daemon left running the old code after an upgrade). The refusals named
    the protocol version only, and the unknown option alone; now they name the daemon's locod version, what
    it knows, and what to do."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.endpoint)
    try:
        socket.send(json.dumps({"v": 2, "id": "newer", "op": "ping"}).encode())
        refused = json.loads(socket.recv())
        options = {"max_tokens": 2, "reasoning": "low"}
        socket.send(json.dumps({"v": 1, "id": "opt", "op": "chat", "prompt": "Hi", "options": options}).encode())
        unknown = json.loads(socket.recv())
    finally:
        socket.close()
    assert refused["code"] == "unsupported_version"
    assert refused["message"].startswith(f"unsupported protocol version 2; this daemon (locod {__version__}) speaks v1")
    assert unknown["code"] == "bad_field" and "unknown keys ['reasoning']; this daemon (locod" in unknown["message"]
    assert "knows max_tokens, temperature" in unknown["message"] and "restart the daemon" in unknown["message"]


def test_a_local_model_replaced_under_its_name_starts_over_from_its_prior(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """Attack: point a local model's name at another GGUF (pulled or configured under the same name). The
    router state is kept per name, so the new model inherited what the old one's heads had learned: its
    predicted competence and a confidence head calibrated on another model's log-probabilities. Now a file
    of another size starts that model over from its prior, said in the log; the same file keeps its labels."""
    name = "smollm2-135m-instruct"  # the embedded model's name, given another file
    mine = {"local": {"models": [{"name": name, "path": str(model_path)}]}}
    handle = daemon_factory(mine)
    client = handle.client()
    client.feedback(client.ask("Say hi.", max_tokens=2).done.decision, True)
    # a label that comes before its turn settles (learning runs after the reply) trains at the settling
    wait_for(lambda: client.status()["routing"]["labels"] == {name: 1}, 60, "the label to train")
    handle.stop()
    same = daemon_factory(mine)
    assert same.client().status()["routing"]["labels"] == {name: 1}
    same.stop()
    other = tmp_path / "other.gguf"  # another file: here the same weights and 4 kB more, so another size
    shutil.copyfile(model_path, other)
    with other.open("ab") as f:
        f.write(bytes(4096))
    replaced = daemon_factory({"local": {"models": [{"name": name, "path": str(other)}]}})
    assert replaced.client().status()["routing"]["labels"] == {}
    assert f"local model {name} is now" in replaced.log() and "it starts over from its prior" in replaced.log()
    assert replaced.client().ask("Say hi.", max_tokens=2).done is not None


def test_a_fifo_among_the_priors_is_left_out_without_waiting(daemon_factory: Any, tmp_path: Path) -> None:
    """Attack: a FIFO named like a prior in the user's priors folder (`<state dir>/priors/*.npz`). np.load
    opened it and waited for a writer for good: no socket, no READY. Now it is left out by name."""
    priors = tmp_path / "d" / "state" / "priors"
    priors.mkdir(parents=True)
    os.mkfifo(priors / "fifo.npz")  # nobody ever writes to it
    handle = daemon_factory()
    assert handle.client().ask("Say hi.", max_tokens=2).done is not None
    assert "fifo.npz is unreadable, left out: " in handle.log() and "not a regular file" in handle.log()
