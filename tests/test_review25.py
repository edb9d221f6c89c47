"""Review 25: the `locod` command split into locod.commands, and the HTTP conversation map kept across a stop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from locod.daemon.conversations import Conversations
from locod.daemon.sessions import SessionStore, TurnTrail

from .test_http import ANSWERED, http_daemon, sdk
from .test_telemetry import FIXTURES


def test_locod_help_imports_neither_pyzmq_nor_the_daemon() -> None:
    """The commands import the client where they talk to the daemon, so that `locod --help` stays quick; the
    package's own ``__init__`` imported it (and pyzmq, and locod.daemon) for every command all the same."""
    probe = (
        "import sys\nfrom locod.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'zmq' or m.startswith('locod.daemon')))\n"
        "from locod import Client, TurnResult\nprint(Client.__module__, TurnResult.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-2:] == ["[]", "locod.client locod.client"], out


def test_a_session_whose_history_was_trimmed_away_is_not_taken_for_one_that_is_gone() -> None:
    """A remembered session that holds no message is gone (expired, or lost with a restart) and takes its
    conversation again. One that lives but whose history was trimmed away whole (a message longer than
    ``daemon.max_history_chars``) counts the trimmed messages: taking the conversation again on top of that
    count put the session's history at the wrong place in it, and the next turn lost the session."""
    store = SessionStore(idle_s=60, max_sessions=10, max_chars=100)
    conversations = Conversations(store, limit=10)
    asked: list[dict[str, str]] = []
    sessions = []
    for question, answer in (("x" * 200, "Long."), ("Shorter?", "Yes."), ("And now?", "Still.")):
        asked.append({"role": "user", "content": question})
        session, sent = conversations.continuing(asked, None, ANSWERED)
        assert session is not None
        store.record(store.open(session, "http"), sent, answer, TurnTrail("local", (), "chat"))
        conversations.answered(asked, answer, session)
        asked.append({"role": "assistant", "content": answer})
        sessions.append(session)
    # the first question was over max_chars, trimmed away whole with its answer: the conversation that session
    # answered is known (attack 26), so it goes on in it from the next question
    assert store.held(sessions[0], "http") == (2, asked[2:])
    assert sessions == [sessions[0]] * 3 and sent == [{"role": "user", "content": "And now?"}], (sessions, sent)


def test_the_map_is_written_anew_whatever_lies_where_it_is_written(tmp_path: Path) -> None:
    """The map is written to ``conversations.json.part`` first: a symlink there was written through (the file
    it names replaced by the map) and a half-written part was left there on a failure."""
    kept, victim = tmp_path / "conversations.json", tmp_path / "victim"
    victim.write_text("mine")
    Path(f"{kept}.part").symlink_to(victim)
    conversations = Conversations(SessionStore(idle_s=60, max_sessions=10), limit=10, kept_in=kept)
    conversations.answered([{"role": "user", "content": "Hi"}], "Hello!", "http-abc")
    conversations.save()
    assert victim.read_text() == "mine" and not Path(f"{kept}.part").exists()
    assert list(Conversations(SessionStore(60, 10), limit=10, kept_in=kept)._known.values()) == ["http-abc"]
    assert kept.stat().st_mode & 0o777 == 0o600


def test_a_fifo_where_the_map_is_written_does_not_hold_the_stop(daemon_factory: Any) -> None:
    """The daemon writes its conversation map at the stop, through ``conversations.json.part``: a FIFO there
    held the stop for good (open() waits for a reader), and with it the states still to be parked."""
    config: dict[str, Any] = {"routing": {"mode": "local"}, "local": {"cache_disk_mb": 64}}
    handle, base = http_daemon(daemon_factory, config)
    question: Any = [{"role": "user", "content": "Hello"}]
    sdk(base).chat.completions.create(model="auto", messages=question, max_tokens=2, temperature=0)
    part = handle.home / "state" / "conversations.json.part"
    os.mkfifo(part)
    assert handle.stop(timeout=120) == 0, handle.log()
    assert not part.exists() and (handle.home / "state" / "conversations.json").stat().st_size > 2


def test_status_names_a_critical_battery_only_where_it_keeps_the_local_models_waiting(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """On battery below routing.battery_critical_pct, routing masks the local models for a cloud model to
    answer: status said so also with routing.mode local and no cloud model, where every turn still ran here."""
    root = tmp_path / "laptop"
    shutil.copytree(FIXTURES / "laptop-battery", root)
    (root / "sys/class/power_supply/BAT0/capacity").write_text("5\n")
    telemetry = {"sysfs_root": str(root / "sys"), "procfs_root": str(root / "proc"), "nvml": False}
    handle = daemon_factory({"routing": {"mode": "local"}, "telemetry": telemetry})
    assert handle.client().ask("Hello", max_tokens=2).done.location == "local"
    status = handle.cli("status")
    assert status.returncode == 0 and "battery 5%" in status.stdout, status.stdout + status.stderr
    assert "battery_critical_pct" not in status.stdout and "local models wait" not in status.stdout
