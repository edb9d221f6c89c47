"""Walk 41: a new user on a fresh machine, from README.md's quick start through chat, attachments, llama.cpp's
server as the cloud, the HTTP door with the SDK and curl, decisions and report, a config broken on purpose,
stop and start, and the systemd unit's ExecStart run by hand. Real daemons (the embedded model) and the real
`locod` command."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DaemonHandle, locod_command, start_daemon
from .fileserver import FileServer, Served

NOTE = "is not the running daemon's config file"


def reload_with(
    daemon: DaemonHandle, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`locod reload` as a user types it, with the config they name (not the daemon's own --config)."""
    return subprocess.run(
        locod_command(*args, "reload"), capture_output=True, text=True, env=env or daemon.env, cwd=cwd, timeout=120
    )


def running_sla(daemon: DaemonHandle) -> float:
    shown = daemon.cli("config", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    return float(json.loads(shown.stdout)["routing"]["sla"])


def test_a_reload_naming_another_config_file_says_it_read_the_daemon_s_own(
    daemon: DaemonHandle, tmp_path: Path
) -> None:
    """Walk finding: `locod --config other.toml reload`, after editing other.toml, answered "reloaded from
    ~/.config/locod/config.toml" and exit 0, and nothing of other.toml applied (a reload re-reads the file the
    daemon started with); `$LOCOD_CONFIG` naming a file that does not exist passed as silently. The command
    now notes that the file named is not the daemon's, and how to run with it."""
    other = tmp_path / "other.toml"
    other.write_text("[routing]\nsla = 0.9\n")
    named = reload_with(daemon, "--config", str(other))
    assert named.returncode == 0, named.stderr
    assert f"note: --config {other} {NOTE} ({daemon.config_path})" in named.stderr, named.stderr
    assert f"`locod --config {other} serve`" in named.stderr, named.stderr
    assert running_sla(daemon) == 0.8  # what the note says: other.toml was not read
    missing = tmp_path / "nope.toml"
    by_variable = reload_with(daemon, env={**daemon.env, "LOCOD_CONFIG": str(missing)})
    assert by_variable.returncode == 0, by_variable.stderr
    assert f"note: $LOCOD_CONFIG {missing} {NOTE}" in by_variable.stderr, by_variable.stderr


def test_a_reload_naming_the_daemon_s_own_file_adds_no_note(daemon: DaemonHandle) -> None:
    """The same file named another way (relative to where the command runs) is the daemon's: no note."""
    same = reload_with(daemon, "--config", daemon.config_path.name, cwd=daemon.config_path.parent)
    assert same.returncode == 0 and NOTE not in same.stderr, same.stderr
    plain = daemon.cli("reload")
    assert plain.returncode == 0 and NOTE not in plain.stderr, plain.stderr


@pytest.fixture
def server() -> Iterator[FileServer]:
    fs = FileServer().start()
    yield fs
    fs.stop()


def test_a_pulled_gguf_cut_short_is_refused_and_removed(tmp_path: Path, server: FileServer, model_path: Path) -> None:
    """Walk finding: `locod models pull URL` of a GGUF the server sent only half of (a whole header, half the
    tensors' data, its Content-Length saying so) printed "installed ... it takes about 138 MiB" and exit 0;
    `locod models list` then called it `cut short`, and the daemon left it out. Pull now checks that the file
    reaches its last tensor's data, as the daemon does, and removes it; the whole file still installs."""
    whole = model_path.read_bytes()
    server.files["half.gguf"] = Served(whole[: len(whole) // 2])
    server.files["whole.gguf"] = Served(whole)
    models = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(LOCOD_MODELS_DIR=str(models), XDG_CONFIG_HOME=str(tmp_path))

    def pull(name: str) -> subprocess.CompletedProcess[str]:
        command = locod_command("models", "pull", f"{server.url}/files/{name}")
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    half = pull("half.gguf")
    assert half.returncode == 1, half.stdout + half.stderr
    assert "the download is a GGUF cut short" in half.stderr and "it was removed" in half.stderr, half.stderr
    assert "installed" not in half.stdout and "Traceback" not in half.stderr
    assert os.listdir(models) == []  # neither the file nor a pulled.toml entry
    assert pull("whole.gguf").returncode == 0
    assert sorted(os.listdir(models)) == ["pulled.toml", "whole.gguf"]


@pytest.mark.parametrize("steps", ["0", "-5", "５", "1_000"])  # the last two: int() took them (review41)
def test_policy_train_with_no_steps_is_refused_before_anything_is_written(tmp_path: Path, steps: str) -> None:
    """Walk finding: `locod policy train --steps 0` (a user trying the command quickly) trained nothing, yet
    exported the untrained network (its reward below random's) over the state directory's policy.onnx, which
    the daemon loads at its next reload, and exited 0 (`--steps -5` as well, as version `rcppo-s0--1k-...`)."""
    out = tmp_path / "policy.onnx"
    command = locod_command("policy", "train", "--steps", steps, "--out", str(out))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert f"argument --steps: expects a number of steps, 1 or more, got '{steps}'" in refused.stderr
    assert not out.exists()


@pytest.mark.parametrize("seed", ["５", "1_0"])
def test_policy_train_reads_its_seed_from_ascii_digits(tmp_path: Path, seed: str) -> None:
    """Every other number of the command line is read from ASCII digits alone (clifuzz41); --seed took these."""
    out = tmp_path / "policy.onnx"
    command = locod_command("policy", "train", "--seed", seed, "--out", str(out))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"argument --seed: invalid int value: '{seed}'" in refused.stderr
    assert not out.exists()


def half_of(model_path: Path, target: Path) -> Path:
    """A GGUF as a copy stopped halfway leaves it: the whole header, half the tensors' data."""
    target.parent.mkdir(parents=True, exist_ok=True)
    whole = model_path.read_bytes()
    target.write_bytes(whole[: len(whole) // 2])
    return target


def test_a_model_file_cut_short_is_refused_with_what_to_do(
    daemon: DaemonHandle, tmp_path: Path, model_path: Path
) -> None:
    """Walk finding: a truncated GGUF as `local.default` was refused, at a reload and at start, with "... is
    cut short: N bytes, where its last tensor begins at byte M" and nothing more, where a missing file says
    what to do. Nothing in the config is wrong: the refusal now says to copy or download the file again (the
    embedded model's: `locod models fetch`, which replaces a file whose SHA-256 is not the manifest's)."""
    half = half_of(model_path, tmp_path / "half.gguf")
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(
        good + f'[local]\ndefault = "half"\n[[local.models]]\nname = "half"\npath = "{half}"\n'
    )
    reload = daemon.cli("reload")
    assert reload.returncode == 2, reload.stderr
    assert f"model 'half': {half} is cut short: " in reload.stderr, reload.stderr
    assert "copy or download it again (`locod models pull`)" in reload.stderr, reload.stderr
    models = tmp_path / "models"
    half_of(model_path, models / model_path.name)
    cut = start_daemon(tmp_path / "cut", models, wait=False)
    assert cut.proc.wait(120) == 3, cut.log()
    assert "as a copy or download that stopped leaves it; run `locod models fetch`" in cut.log(), cut.log()
