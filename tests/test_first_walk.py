"""What a tester found walking the README on a fresh clone, each through the real CLI in a subprocess (and a
real daemon where one is needed): the command lines the docs show work as written, and what goes wrong
says what happened and what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import locod_command


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No config file of the user's, no LOCOD_* of the caller's: a fresh install's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), LOCOD_STATE_DIR=str(tmp_path / "state"))
    env.update(LOCOD_RUNTIME_DIR=str(tmp_path / "run"), LOCOD_MODELS_DIR=str(tmp_path / "models"), **extra)
    return env


def locod(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120)


def test_global_options_work_after_the_command_too(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    shown = locod(env, "--set", "routing.sla=0.3", "config", "show", "--set", "routing.mode=local", "--json")
    assert shown.returncode == 0, shown.stderr
    routing = json.loads(shown.stdout)["routing"]
    assert (routing["sla"], routing["mode"]) == (0.3, "local")  # before and after the command: both kept
    for command in (["serve"], ["models", "pull"], ["config", "show"]):
        helped = locod(env, *command, "--help").stdout
        assert "--set SECTION.KEY=VALUE" in helped and "--config" in helped, command


def test_a_reader_that_leaves_ends_the_output_quietly(tmp_path: Path) -> None:
    piped = subprocess.run(
        f"{' '.join(locod_command('config', 'show'))} | head -1; echo rc=${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
    )
    assert piped.stderr == "" and "rc=141" in piped.stdout  # as SIGPIPE would end it: no "Broken pipe" line


def test_policy_train_help_needs_no_torch(tmp_path: Path) -> None:
    """`import torch` made to fail the standard way (a None entry in sys.modules), as on an install without
    the train extra: the help is shown; only training itself says the extra is needed."""
    blocked = "import sys; sys.modules['torch'] = None; from locod.cli import main; sys.exit(main(sys.argv[1:]))"
    env = clean_env(tmp_path)

    def train(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", blocked, "policy", "train", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    helped = train("--help")
    assert helped.returncode == 0 and "--steps" in helped.stdout and "--from-db" in helped.stdout, helped.stderr
    trained = train("--steps", "8")
    assert trained.returncode == 1 and "needs the train extra" in trained.stderr, trained.stderr
    assert "pip install '.[train]'" in trained.stderr
