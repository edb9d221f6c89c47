"""The thirteenth walk: a user who scripts locod from the shell (exit statuses, `--json` on a pipe, stdin, the
locale, signals). Every test runs the real `locod` command against a real daemon and the embedded model."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import DaemonHandle, locod_command, wait_for


def run_cli(
    handle: DaemonHandle, *args: str | bytes, stdin: bytes = b"", **env: str
) -> subprocess.CompletedProcess[bytes]:
    """`locod` with bytes in and out: what a shell pipes is not always text."""
    return subprocess.run(
        [*locod_command("--config", str(handle.config_path)), *args],
        input=stdin,
        capture_output=True,
        env={**handle.env, **env},
        timeout=120,
    )


def test_a_busy_daemon_exits_6_and_ask_json_ends_with_an_error_frame(daemon_factory: Any) -> None:
    """A turn refused at the queue limit exited 1, as a misspelt model does, so a script could not tell
    "try again" from "change the request"; and `ask --json` printed nothing on stdout, leaving a `jq`
    reading the frames with an empty stream. Now busy is 6, and the stream ends with the error frame."""
    handle = daemon_factory({"daemon": {"queue_limit": 1}})
    unknown = run_cli(handle, "ask", "--json", "Hello", "--model", "nope")
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["code"] == "unknown_model", unknown.stderr
    holder = handle.client()
    wait_for(lambda: holder.status()["queue"]["in_flight"] == 0, 30, "the refused turn to leave the queue")
    frames = holder.chat("Write a long essay about the history of Rome.", max_tokens=400)
    next(frames)  # the decision: the one turn the queue holds is in flight
    refused = run_cli(handle, "ask", "--json", "Hello")
    holder.close()
    assert refused.returncode == 6, refused.stderr
    *_, last = refused.stdout.decode().splitlines()
    error = json.loads(last)
    assert (error["type"], error["kind"], error["code"]) == ("error", "busy", "busy"), last
    assert refused.stderr.decode() == "locod: 1 turn in flight, at the queue limit; try again shortly\n"
    assert "6    busy: at a queue limit" in run_cli(handle, "--help").stdout.decode()


def test_a_prompt_that_is_not_utf8_is_refused_by_name(daemon: DaemonHandle) -> None:
    """A Latin-1 file piped to `locod ask` was refused as "a lone UTF-16 surrogate escape", words about
    Python's internals that did not say the input was the problem; now the message names it and a fix."""
    piped = run_cli(daemon, "ask", stdin="Résumé of a café\n".encode("latin-1"))
    assert piped.returncode == 1, piped.stderr
    said = piped.stderr.decode()
    assert "the prompt on standard input is not UTF-8 text (byte 0xe9 at character 1)" in said, said
    assert "iconv -f latin1 -t utf-8" in said and "surrogate" not in said
    given = run_cli(daemon, "ask", "caf\xe9".encode("latin-1"))
    assert given.returncode == 1 and b"the prompt on the command line is not UTF-8 text" in given.stderr
    assert daemon.rows() == []


def test_an_ascii_locale_shows_what_it_cannot_encode_as_escapes(daemon: DaemonHandle) -> None:
    """With an output encoding that cannot hold an answer's text (a Latin-1 or ASCII locale), `locod ask`
    stopped at the answer's first emoji with a UnicodeEncodeError traceback; `decisions` at a session's name."""
    asked = run_cli(daemon, "ask", "Hi", "--session", "café-☃", "--max-tokens", "2")
    assert asked.returncode == 0, asked.stderr
    table = run_cli(daemon, "decisions", PYTHONIOENCODING="ascii")
    assert table.returncode == 0 and b"Traceback" not in table.stderr, table.stderr
    assert b"caf\\xe9-\\u2603" in table.stdout, table.stdout


def test_ctrl_c_exits_130_and_the_turn_is_recorded_cancelled(daemon: DaemonHandle) -> None:
    """The README's promise to a script that bounds a turn: Ctrl-C (as SIGTERM, from `timeout`) stops
    `locod ask` at once, and the daemon records the turn cancelled rather than answering on for nobody."""
    command = [*locod_command("--config", str(daemon.config_path)), "ask", "Write a long essay about Rome."]
    proc = subprocess.Popen(
        [*command, "--max-tokens", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=daemon.env
    )
    assert proc.stdout is not None and proc.stdout.read(1)  # the answer has begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err

    def recorded() -> list[dict[str, Any]]:
        return daemon.rows("SELECT outcome FROM decisions WHERE finished IS NOT NULL")

    assert wait_for(recorded, 30, "the turn's record") == [{"outcome": "cancelled"}]


def test_a_dialogue_piped_into_chat_gets_its_answers_alone(daemon: DaemonHandle) -> None:
    """`printf 'q1\\nq2\\n' | locod chat > answers.txt` wrote "> " before each answer and a last "> " line:
    the prompt is for a person typing, and a script had to strip it from the answers."""
    chat = run_cli(daemon, "chat", "--max-tokens", "3", stdin=b"Say hi\nSay bye\n")
    assert chat.returncode == 0, chat.stderr
    answers = chat.stdout.decode().splitlines()
    assert answers and not any(line.startswith("> ") or line == ">" for line in answers), answers
    assert [row["turn"] for row in daemon.rows()] == [0, 1]


def test_a_daemon_still_loading_is_not_said_to_be_stopped(tmp_path: Path) -> None:
    """`locod ask` in a script run while the daemon loads its models said "locod is not running ... start it
    with `locod serve`", and starting one then failed as "already running". The daemon's lock on its runtime
    directory (held here as a starting daemon holds it, before its socket exists) now says it is starting."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "LOCOD_RUNTIME_DIR": str(run), "HOME": str(tmp_path)}
    command = [*locod_command(), "status"]
    with (run / "locod.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        loading = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert loading.returncode == 5 and "locod is starting or stopping: a daemon holds" in loading.stderr
    assert "locod serve" not in loading.stderr, loading.stderr
    stopped = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert stopped.returncode == 5 and "locod is not running (no socket at" in stopped.stderr, stopped.stderr


SESSION_AND_CRON = """
set -e
mount -t tmpfs -o mode=0755 tmpfs /run/user
mkdir -m 0700 /run/user/$(id -u)
XDG_RUNTIME_DIR=/run/user/$(id -u) "$@" serve > "$LOG" 2>&1 &
trap 'kill $!' EXIT
for _ in $(seq 600); do [ -S /run/user/$(id -u)/locod/locod.sock ] && break; sleep 0.1; done
env -u XDG_RUNTIME_DIR "$@" status --json > "$OUT"
"""


def test_a_cron_job_finds_the_daemon_of_the_users_session(tmp_path: Path, models_dir: Path) -> None:
    """A daemon started in a login session (the user service, `locod serve` in a terminal) serves under
    $XDG_RUNTIME_DIR, /run/user/$UID; a cron job has no XDG_RUNTIME_DIR, so its `locod ask` looked under
    /tmp/locod-$UID and said locod was not running. Run in a mount namespace of its own: /run/user here is
    a tmpfs no other process sees."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs a mount namespace (unshare -m, as root)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "XDG_RUNTIME_DIR"))}
    env |= {"LOCOD_STATE_DIR": str(tmp_path / "state"), "LOCOD_MODELS_DIR": str(models_dir), "HOME": str(tmp_path)}
    env |= {"LOG": str(tmp_path / "daemon.log"), "OUT": str(tmp_path / "status.json")}
    run = subprocess.run(
        ["unshare", "-m", "bash", "-c", SESSION_AND_CRON, "cron", *locod_command()],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr + (tmp_path / "daemon.log").read_text()
    assert json.loads((tmp_path / "status.json").read_text())["pid"] > 0


def test_a_closed_stdin_or_a_full_output_is_one_line(daemon: DaemonHandle) -> None:
    """`locod ask <&-` (a job started with no stdin) ended in an AttributeError traceback, and an answer
    written to a full disk said "locod: : No space left on device", naming an empty file."""
    command = [*locod_command("--config", str(daemon.config_path)), "ask"]
    closed = subprocess.run(
        ["bash", "-c", '"$@" <&-', "job", *command], capture_output=True, text=True, env=daemon.env, timeout=60
    )
    assert closed.returncode == 1, closed.stderr
    assert closed.stderr == "locod: the prompt read from standard input is empty\n"
    with open("/dev/full", "w") as full:
        written = subprocess.run(
            [*command, "Hi", "--max-tokens", "2"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=daemon.env,
            timeout=60,
        )
    assert written.returncode == 1 and written.stderr == "locod: writing the output: No space left on device\n"


def test_a_stopped_daemon_is_not_said_to_be_missing(daemon: DaemonHandle) -> None:
    """`locod status` as a health check, against a daemon stopped with SIGSTOP (or swapping): after 10 s it
    said "is it running? start it with `locod serve`", and a script that did so got a second daemon's
    refusal. The client has seen its socket take connections all along: it says the daemon does not answer."""
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        status = daemon.cli("status", timeout=60)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert status.returncode == 5 and "for 10 s, though its socket takes connections" in status.stderr
    assert "locod serve" not in status.stderr, status.stderr
