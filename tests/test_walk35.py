"""Walk 35: a newcomer on a fresh clone, from the README alone, and the first guesses such a user makes
(``locod help ask``, a mistyped command). Each through the real `locod` command in a subprocess, next to a
real daemon with the embedded model."""

from __future__ import annotations

from pathlib import Path

from .conftest import MODEL_NAME, DaemonHandle, start_daemon
from .fileserver import FileServer, Served


def test_help_before_a_command_shows_its_help_and_a_typo_names_the_command_meant(daemon: DaemonHandle) -> None:
    """`locod help ask` (as git's, pip's and ollama's `help`) was refused as "invalid choice: 'help'", and a
    typo (`locod stauts`) listed all twelve commands for the user to spot the one meant."""
    helped = daemon.cli("help", "ask")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout == daemon.cli("ask", "--help").stdout
    nested = daemon.cli("help", "models", "pull")
    assert nested.returncode == 0 and "--sha256" in nested.stdout, nested.stderr
    overall = daemon.cli("help")
    assert overall.returncode == 0 and "exit status (for scripts" in overall.stdout, overall.stderr

    for typed, meant in (("stauts", "status"), ("askk", "ask"), ("desicions", "decisions"), ("model", "models")):
        mistyped = daemon.cli(typed)
        assert mistyped.returncode == 2, mistyped.stderr
        assert f"locod has no {typed!r} command; did you mean `locod {meant}`?" in mistyped.stderr
    unlike = daemon.cli("xyzzy")  # nothing close: argparse's list of every command stays
    assert unlike.returncode == 2 and "invalid choice: 'xyzzy' (choose from 'serve', 'ask'" in unlike.stderr
    assert daemon.cli("status").returncode == 0  # the daemon was asked nothing meanwhile


def test_the_routing_cost_beside_a_turns_dollars_is_said_to_be_relative(daemon: DaemonHandle) -> None:
    """`ask -v` said "25% likely good at cost 1.00" on the line above "$0.00000": a newcomer read a dollar
    on a local turn. The rule's cost is no money but a share of the dearest action on offer."""
    asked = daemon.cli("ask", "-v", "--max-tokens", "2", "Hi")
    assert asked.returncode == 0, asked.stderr
    assert "likely good at relative cost 1.00;" in asked.stderr and "$0.00000]" in asked.stderr
    assert "at cost" not in asked.stderr
    decision = str(daemon.rows()[-1]["id"])
    shown = daemon.cli("decisions", decision).stdout
    assert "and relative cost (1.00: the dearest on offer)" in shown
    assert f"{MODEL_NAME}: " in shown and ", relative cost 1.00 <- chosen" in shown


def test_a_label_in_capitals_and_the_short_version_flag_are_taken(daemon: DaemonHandle) -> None:
    """`locod feedback ID Good` was refused for its capital letter alone, and `locod -V` (as python's, pip's
    and many tools' short version flag) asked for a command."""
    assert daemon.cli("ask", "--max-tokens", "2", "Hi").returncode == 0
    decision = str(daemon.rows()[-1]["id"])
    labelled = daemon.cli("feedback", decision, "Good")
    assert labelled.returncode == 0, labelled.stderr
    assert daemon.rows()[-1]["satisfied"] == 1
    version = daemon.cli("-V")
    assert version.returncode == 0 and version.stdout == daemon.cli("--version").stdout
    assert version.stdout.startswith("locod ")


def test_models_rm_says_whether_the_running_daemon_can_still_answer_with_the_model(
    tmp_path: Path, model_path: Path
) -> None:
    """`locod models rm` said "the running daemon offers NAME until `locod reload`" of every model the daemon
    named, loaded or not; one it had not loaded it could no longer load, and `ask --model NAME` failed (exit
    3, "file not found"). Only a loaded model answers on until the reload."""
    models = tmp_path / "models"
    models.mkdir()
    (models / model_path.name).symlink_to(model_path)
    weights = model_path.read_bytes()
    server = FileServer({"loaded.gguf": Served(weights), "idle.gguf": Served(weights)}).start()
    handle = start_daemon(tmp_path / "d", models)
    try:
        for name in ("loaded", "idle"):
            assert handle.cli("models", "pull", f"{server.url}/files/{name}.gguf").returncode == 0
        assert handle.cli("reload").returncode == 0
        assert handle.cli("ask", "--model", "loaded", "--max-tokens", "2", "Hi").returncode == 0

        removed = handle.cli("models", "rm", "loaded")
        assert "the running daemon offers loaded until `locod reload`" in removed.stderr, removed.stderr
        assert handle.cli("ask", "--model", "loaded", "--max-tokens", "2", "Hi").returncode == 0

        removed = handle.cli("models", "rm", "idle")
        assert "the running daemon still lists idle, which it can no longer load, until `locod reload`" in (
            removed.stderr
        )
        assert handle.cli("ask", "--model", "idle", "--max-tokens", "2", "Hi").returncode == 3
    finally:
        handle.stop()
        server.stop()
