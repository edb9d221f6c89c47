"""The sixteenth walk: the admin of a shared box, following README.md and docs/operations.md to learn who can
talk to the daemon, to keep it running for months (backups, pruning, a full disk, a log deleted under it)
and to upgrade it. Every test runs a real daemon with the embedded model, on real files."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

import locod.cli as cli
import locod.client as client_module
from locod.client import Client, locate
from locod.daemon.records import MIGRATIONS, DecisionLog
from locod.errors import LocodError, StorageError

from .conftest import daemon_on_a_full_disk, free_port, start_daemon, wait_for

NOBODY = 65534


def _as_another_user(act: Callable[[], str], system_socket: str) -> str:
    """What ``act`` returns when another local user (uid 65534) runs it, with ``system_socket`` in the place
    of the system service's. Run in a forked child that drops root: everything it needs is imported already
    (as nobody it could not read an interpreter under /root)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        found = ""
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            client_module.SYSTEM_SOCKET = Path(system_socket)
            for variable in [v for v in os.environ if v.startswith(("LOCOD_", "XDG_"))]:
                del os.environ[variable]
            os.environ["HOME"] = "/nonexistent-home"  # the other user's, which holds no locod files
            found = act()
        except BaseException as exc:  # reported to the parent, which asserts on it
            found = f"child failed: {exc!r}"
        finally:
            os.write(write_end, found.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as findings:
        text = findings.read()
    os.waitpid(pid, 0)
    return text


def _clients_of(endpoint: str) -> str:
    """A Client of ``endpoint`` named, then of the user's own socket, which is missing."""
    lines = []
    for named in (endpoint, "ipc:///nonexistent-home/locod/locod.sock"):
        try:
            Client(locate(named)).close()
            lines.append("connected")
        except LocodError as exc:
            lines.append(f"{exc.code}: {exc.message}")
    return "\n".join(lines)


def test_another_users_socket_says_whose_it_is_and_what_to_use(daemon: Any) -> None:
    """As another local user, `locod ask` on a box whose system service runs said "locod: /run/locod/locod.sock:
    Permission denied" (exit 1): neither whose socket that is nor what a user who is not the service's should
    use. Now it says the socket serves its own user and root alone, and points to the tcp endpoint or HTTP
    API, whether the endpoint was named or found in the system service's place."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another local user")
    findings = _as_another_user(lambda: _clients_of(daemon.endpoint), daemon.endpoint[6:]).splitlines()
    assert len(findings) == 2, findings
    for finding in findings:
        assert finding.startswith("unsafe_socket: "), finding
        assert "is not open to this user" in finding and "belongs to root" in finding, finding
        assert "serves its own user and root alone" in finding, finding
        assert "tcp endpoint or HTTP API" in finding and "docs/operations.md, Who can use it" in finding, finding
        assert "Permission denied" not in finding, finding
    # one whose own daemon is stopped is told that too, not only that the service's socket is closed to them
    assert "locod is not running at /nonexistent-home/locod/locod.sock (`locod serve` starts it)" in findings[1]


def test_another_user_is_told_the_tcp_endpoint_the_config_opens(daemon_factory: Any, tmp_path: Path) -> None:
    """The admin opened the tcp endpoint to the others in the machine's config, as docs/operations.md ("Who
    can use it") says; a user's plain `locod ask` met the service's socket and was not told the endpoint
    their own `locod` reads in that config. Now the refusal names it, and how to use it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another local user")
    tcp = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": tcp}})
    shared = Path(tempfile.mkdtemp(prefix="locod-walk16-"))  # the machine's config: readable by every user
    try:
        shared.chmod(0o755)
        config = shared / "config.toml"
        config.write_text(handle.config_path.read_text())
        config.chmod(0o644)

        def ask() -> str:
            sys.stderr = io.StringIO()
            code = cli.main(["--config", str(config), "ask", "hi", "--max-tokens", "2"])
            return f"{code} {sys.stderr.getvalue()}"

        said = _as_another_user(ask, handle.endpoint[6:])
    finally:
        shutil.rmtree(shared)
    assert said.startswith("1 locod: "), said
    assert "is not open to this user" in said, said
    assert f"the config opens {tcp} (daemon.tcp): `locod --endpoint {tcp} ...`" in said, said


def test_status_names_the_socket_config_and_decision_log(daemon: Any) -> None:
    """docs/operations.md says `locod status` names the socket, config file and decision log the running
    daemon uses (what an admin backs up, prunes and gives access to); only `--json` held them."""
    shown = daemon.cli("status")
    assert shown.returncode == 0, shown.stderr
    files = next(line for line in shown.stdout.splitlines() if line.strip().startswith("files"))
    assert f"socket {daemon.endpoint}" in files, files
    assert f"config {daemon.config_path}" in files, files
    assert f"decision log {daemon.db_path}" in files, files


def test_a_decision_log_deleted_under_the_daemon_shows_in_status_and_the_log(daemon: Any) -> None:
    """With locod.db deleted under a running daemon, every turn was refused (db_replaced), as the docs say,
    but `locod status` had no warning and the daemon's log (a service's journal) not a line: the admin
    heard of it only from the users. Now status warns until the restart, and the log says it once."""
    client = daemon.client()
    assert client.ask("before", max_tokens=2).done.outcome == "ok"
    daemon.db_path.unlink()
    for prompt in ("after", "again"):
        with pytest.raises(StorageError) as refused:
            client.ask(prompt, max_tokens=2)
        assert refused.value.code == "db_replaced"
    shown = daemon.cli("status")
    assert shown.returncode == 0, shown.stderr
    assert "warning: decision log " in shown.stdout and "was removed or replaced while the daemon" in shown.stdout
    assert "restart the daemon" in shown.stdout
    said = [line for line in daemon.log().splitlines() if "WARNING" in line and "removed or replaced" in line]
    assert len(said) == 1, daemon.log()


def test_a_full_disk_is_logged_once_and_its_end_too(tmp_path: Path, models_dir: Path, small_disk: Path) -> None:
    """With the state directory's disk full, turns were refused (disk_full) with nothing in the daemon's log:
    an admin reading the journal of a service saw nothing wrong. Now the first refusal is logged, and so is
    the first write once space is back."""
    with daemon_on_a_full_disk(tmp_path / "d", models_dir, small_disk) as (handle, filler):
        client = handle.client()
        refusals = 0
        for i in range(50):  # the WAL's spare pages fill first
            try:
                client.ask("word " * 700 + str(i), max_tokens=2, force="local")
            except StorageError as exc:
                assert exc.code == "disk_full", exc
                refusals += 1
                if refusals == 2:
                    break
        assert refusals == 2
        filler.unlink()
        assert client.ask("after", max_tokens=2).done.outcome == "ok"
        wait_for(lambda: "is written again" in handle.log(), 30, "the log to say the decision log is written again")
        full = [line for line in handle.log().splitlines() if "WARNING" in line and "the disk it is on is full" in line]
        assert len(full) == 1, handle.log()


def test_an_upgrade_that_migrates_the_log_says_so_once(tmp_path: Path, models_dir: Path) -> None:
    """Upgrading over an existing state directory, the decision log of the old version was migrated without
    a word (below 32 MB): the admin learned that the old version would now refuse it only when going back.
    Now the first start says it migrated it and that the backup is the way back; the next start is silent."""
    old_version = len(MIGRATIONS) - 2
    db = tmp_path / "d" / "state" / "locod.db"
    db.parent.mkdir(parents=True, mode=0o700)
    conn = sqlite3.connect(db, isolation_level=None)
    for number, step in enumerate(MIGRATIONS[:old_version], start=1):
        step(sqlite_utils.Database(conn))
        conn.execute(f"PRAGMA user_version = {number}")
    row = {"created": 1.7e9, "session": "before", "turn": 0, "task": "chat", "location": "local"}
    sqlite_utils.Database(conn)["decisions"].insert(row | {"model": "smollm2-135m-instruct", "outcome": "ok"})
    conn.close()
    said = f"decision log {db} migrated from schema {old_version} to {len(MIGRATIONS)}"
    for _ in range(2):  # the upgrade's first start, then an ordinary one
        handle = start_daemon(tmp_path / "d", models_dir, {})
        try:
            shown = handle.cli("decisions")
            assert shown.returncode == 0 and "before" in shown.stdout, shown
        finally:
            handle.stop()
        assert handle.log().count(said) == 1, handle.log()
    assert "a backup taken before the upgrade is the way back" in handle.log()


def test_another_users_decision_log_says_whose_it_is(tmp_path: Path) -> None:
    """With the daemon stopped, another user's `locod decisions` reads the service's log itself, and ended in a
    bare "Permission denied" (or, where Python's stat answers False, in "the daemon has not answered a turn
    yet"): the service's state directory is its own user's. Now it says whose the log is and how to read it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another local user")
    shared = Path(tempfile.mkdtemp(prefix="locod-walk16-"))  # the machine's config: readable by every user
    try:
        shared.chmod(0o755)
        state = shared / "state"
        state.mkdir(mode=0o700)
        DecisionLog(state / "locod.db").close()
        config = shared / "config.toml"
        config.write_text(f'[paths]\nstate_dir = "{state}"\nruntime_dir = "{shared / "run"}"\n')
        config.chmod(0o644)

        def decisions() -> str:
            sys.stderr = io.StringIO()
            code = cli.main(["--config", str(config), "decisions"])
            return f"{code} {sys.stderr.getvalue()}"

        said = _as_another_user(decisions, str(shared / "run" / "locod.sock"))
    finally:
        shutil.rmtree(shared)
    assert said.startswith("4 locod: "), said
    assert f"cannot read the decision log {state / 'locod.db'}: it is not open to this user" in said, said
    assert f"{state} belongs to root (mode 700)" in said and "`sudo -u root locod ...`" in said, said
    assert "Permission denied" not in said and "has not answered a turn yet" not in said, said
