"""The daemon in the environments real machines give it: long, relative, non-ASCII and symlinked paths, an ASCII
locale, umask 000, a full disk at start, a bounded address space. Each runs the real `locod` command (and a
real daemon with the embedded model where the fault is the daemon's); each either works or is refused in one
line that names the problem and what to do, never a traceback."""

from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from locod.client import attachment
from locod.daemon.config import load_config
from locod.errors import ConfigError

from .conftest import DaemonHandle, locod_command, wait_for
from .fileserver import FileServer, Served, gguf_bytes


def _env(tmp_path: Path, models_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(
        LOCOD_STATE_DIR=str(tmp_path / "state"),
        LOCOD_RUNTIME_DIR=str(tmp_path / "run"),
        LOCOD_MODELS_DIR=str(models_dir),
        XDG_CONFIG_HOME=str(tmp_path / "no-config"),
    )
    env.update(extra)
    return env


def _serve(env: dict[str, str], *python: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`locod serve` run to its end: each of these starts is refused before the daemon serves."""
    command = [sys.executable, *python, "-m", "locod.cli", "serve"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, **kwargs)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("locod: ")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    return errors[0]


def test_a_runtime_dir_too_long_for_a_socket_address_is_refused_before_the_model_loads(
    tmp_path: Path, models_dir: Path
) -> None:
    """A Unix socket's path holds at most 107 bytes (sun_path). A deeper $LOCOD_RUNTIME_DIR (a CI runner's
    workspace, a home under a long mount) loaded the model, then ended in ZeroMQ's traceback at the bind."""
    deep = tmp_path / ("d" * 100)
    result = _serve(_env(tmp_path, models_dir, LOCOD_RUNTIME_DIR=str(deep)))
    said = _one_line(result)
    assert result.returncode == 2, result.stderr
    assert said.startswith("locod: $LOCOD_RUNTIME_DIR: the socket's path ") and "over the 107" in said, said
    assert "set paths.runtime_dir ($LOCOD_RUNTIME_DIR) to a shorter directory" in said, said
    assert "loaded local model" not in result.stderr  # refused before the model's seconds of loading


def test_relative_xdg_directories_are_ignored_as_the_spec_says(tmp_path: Path) -> None:
    """The XDG Base Directory spec: a relative $XDG_* is invalid and ignored. Taken, it put the state and the
    socket under whichever directory the daemon started in, and a client started elsewhere found no daemon."""
    env = {"XDG_STATE_HOME": "state", "XDG_DATA_HOME": "data", "XDG_CONFIG_HOME": "config"}
    config = load_config(env={**env, "XDG_RUNTIME_DIR": "run"})
    home = Path.home()
    assert config.state_dir == home / ".local/state/locod"
    assert config.models_dir == home / ".local/share/locod/models"
    assert config.runtime_dir == Path(f"/tmp/locod-{os.getuid()}/locod")
    assert load_config(env={"XDG_STATE_HOME": str(tmp_path)}).state_dir == tmp_path / "locod"  # absolute: taken


def test_a_huge_value_is_quoted_by_its_head_and_each_value_by_its_origin(tmp_path: Path) -> None:
    """A 100 kB variable (a file's content pasted into it) was echoed whole: the one line of the error was
    screens long. And $LOCOD_HUB_ENDPOINT's error named "(defaults)" as where the value came from."""
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    with pytest.raises(ConfigError) as refused:
        load_config(env={**env, "LOCOD_SLA": "9" * 100_000 + "x"})
    said = refused.value.message
    assert said.startswith("$LOCOD_SLA: routing.sla expects a number, got '999") and len(said) < 300, said
    assert said.endswith("... (100,001 characters)"), said
    with pytest.raises(ConfigError, match=r"^\$LOCOD_HUB_ENDPOINT: local\.hub_endpoint must be an http\(s\) URL"):
        load_config(env={**env, "LOCOD_HUB_ENDPOINT": "ftp://mirror"})


def test_a_non_ascii_runtime_dir_and_prompt_work_in_an_ascii_locale(tmp_path: Path, models_dir: Path) -> None:
    """With LC_ALL=C and Python's UTF-8 mode off (`-X utf8=0`, as some images' Pythons run), Python reads a
    non-ASCII path as escaped bytes: the daemon made its directory, then pyzmq encoded the path as UTF-8 and
    the bind failed in a traceback. And `ask` refused a UTF-8 prompt as "not UTF-8 text"."""
    home = tmp_path / "Données ü"
    env = _env(home, models_dir, LC_ALL="C", PYTHONUNBUFFERED="1")
    env.pop("PYTHONUTF8", None)
    env.pop("PYTHONIOENCODING", None)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-X", "utf8=0", "-m", "locod.cli", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:

        def serving() -> bool:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            return b"serving on" in log_path.read_bytes()

        wait_for(serving, 120, "the daemon to serve")
        assert (home / "run" / "locod.sock").exists()
        asked = subprocess.run(
            [sys.executable, "-X", "utf8=0", "-m", "locod.cli", "ask", "Réponds: ça va?", "--max-tokens", "4"],
            capture_output=True,
            env=env,
            timeout=120,
        )
        assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
        chatted = subprocess.run(
            [sys.executable, "-X", "utf8=0", "-m", "locod.cli", "chat", "--max-tokens", "4"],
            input="Réponds: ça va?\n".encode(),
            capture_output=True,
            env=env,
            timeout=120,
        )
        assert chatted.returncode == 0 and chatted.stdout.strip() and b"locod: " not in chatted.stderr, chatted.stderr
    finally:
        proc.terminate()
        proc.wait(60)
    assert b"Traceback" not in log_path.read_bytes()


def test_a_file_name_that_is_not_utf8_is_attached(daemon: DaemonHandle, tmp_path: Path) -> None:
    """A file from a FAT stick or a Windows zip is named in Latin-1 (`caf\\xe9.txt`): its name, as Python
    holds it, made the whole request "hold a lone UTF-16 surrogate escape", naming neither the file nor what
    to do. Its name now goes as text with the odd byte escaped."""
    path = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.txt"))
    path.write_text("The cafe opens at nine.\n")
    assert attachment(path).name == "caf\\xe9.txt"
    asked = daemon.cli("ask", "When does it open?", "--attach", str(path), "--max-tokens", "4")
    assert asked.returncode == 0, asked.stderr
    assert "surrogate" not in asked.stderr


def test_what_locod_writes_under_umask_000_is_not_writable_by_others(tmp_path: Path) -> None:
    """A container's shell or a CI runner may run with umask 000: `locod models pull` made the models
    directory 0777 and the GGUF 0666, so any local user could swap the weights the daemon loads."""
    server = FileServer().start()
    try:
        server.files["m.gguf"] = Served(gguf_bytes(1 << 20, context_length=1024, file_type=7))
        models = tmp_path / "new" / "models"
        env = _env(tmp_path, models)
        pulled = subprocess.run(
            locod_command("models", "pull", f"{server.url}/files/m.gguf", "--name", "tiny"),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            preexec_fn=lambda: os.umask(0),
        )
    finally:
        server.stop()
    assert pulled.returncode == 0, pulled.stderr
    for path in (models.parent, models, models / "tiny.gguf", models / "pulled.toml"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), f"{path}: {mode:o}"


def test_a_full_disk_at_start_says_so(tmp_path: Path, models_dir: Path) -> None:
    """A state directory on a full disk: SQLite, finding no room for the log's -wal and -shm, says only
    "disk I/O error", which the start passed on. Now it says the disk is full, as a turn's write does."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode
    ):
        pytest.skip("needs unshare with user namespaces to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = _env(tmp_path, models_dir, LOCOD_STATE_DIR=str(disk / "state"))
    script = (
        'mount -t tmpfs -o size=1m tmpfs "$0" || exit 99; mkdir -m 700 "$0/state"; '
        'dd if=/dev/zero of="$0/fill" bs=4k 2>/dev/null; "$@"'
    )
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(disk)]
    result = subprocess.run([*command, *locod_command("serve")], capture_output=True, text=True, env=env, timeout=120)
    said = _one_line(result)
    assert result.returncode == 4, result.stderr
    assert "the disk it is on is full; free space there and start again" in said, said


def test_a_model_load_failing_under_ulimit_v_names_the_limit(tmp_path: Path, models_dir: Path) -> None:
    """Under `ulimit -v` (a CI runner's or container's limit) llama.cpp's allocations fail and the start said
    only "Failed to create llama_context", as for a broken file. Now the message names the limit."""
    limit = 976 << 20  # the libraries load within it; the model's context does not
    try:
        result = _serve(
            _env(tmp_path, models_dir), preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        )
    except subprocess.TimeoutExpired:  # served: this machine's llama.cpp needs less
        pytest.skip(f"the daemon loads its model within {limit >> 20} MiB of address space here")
    if result.returncode < 0:  # this machine's libraries alone need more (OpenCV's import crashes under less)
        pytest.skip(f"the daemon's libraries need more than {limit >> 20} MiB of address space here")
    loads = [line for line in result.stderr.splitlines() if "llama.cpp could not load" in line]
    if result.returncode != 3 or not loads:  # failed elsewhere (a thread, an import): not what this tests
        pytest.skip(f"under this limit the start failed before the model's load here: {result.stderr[-500:]}")
    said = _one_line(result)
    assert "address space is limited to 976 MiB, ulimit -v" in said and "ulimit -v unlimited" in said, said


def test_a_symlinked_state_directory_is_refused_with_the_directory_to_name(tmp_path: Path, models_dir: Path) -> None:
    """A Jetson's state moved to its NVMe and linked from ~/.local/state/locod is refused (whoever can change
    a link's target owns what is kept there), but the refusal said "fix its owner or mode", which cannot
    help; it now names the directory to set instead."""
    (tmp_path / "nvme").mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(tmp_path / "nvme")
    result = _serve(_env(tmp_path, models_dir))
    said = _one_line(result)
    assert result.returncode == 4, result.stderr
    assert f"name the directory itself ({tmp_path / 'nvme'}) in paths.state_dir" in said, said
    assert "fix its owner or mode" not in said


def test_a_home_the_user_may_not_write_is_refused_with_where_to_put_the_state(tmp_path: Path, models_dir: Path) -> None:
    """A service user's home is often /nonexistent, and a state directory may sit on a read-only mount: the
    start said "cannot use DIR: Permission denied" and no more. It now says which settings move it."""
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o500)
    env = _env(tmp_path, models_dir, LOCOD_STATE_DIR=str(closed / "locod"))
    if os.access(closed, os.W_OK):  # root writes anywhere: a file where the directory's parent should be
        closed.chmod(0o700)
        (closed / "file").write_text("")
        env["LOCOD_STATE_DIR"] = str(closed / "file" / "locod")
    result = _serve(env)
    said = _one_line(result)
    assert result.returncode == 4, result.stderr
    assert said.startswith(f"locod: cannot use {env['LOCOD_STATE_DIR']}") and "$LOCOD_STATE_DIR" in said, said
