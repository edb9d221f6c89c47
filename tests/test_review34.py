"""Review 34 of the log throttles and the folder syncs: a throttled line must not hide another cause under
the same key, and a folder that cannot be synced must not turn a finished rename into a reported failure.
Real daemon, real model, the fault proxy as the cloud, the real `locod` command; lines counted, never timed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.catalog import pulled_models

from .conftest import SECRET, cloud_config
from .faultproxy import Fault, FaultProxy
from .fileserver import FileServer, Served, gguf_bytes


def _lines(log: str, words: str) -> list[str]:
    return [line for line in log.splitlines() if words in line]


def test_a_refused_key_after_a_refused_request_is_logged(daemon_factory: Any) -> None:
    """Review finding: cloud fallbacks were throttled per model and error code, and every HTTP status is
    `cloud_http`: after a turn the endpoint refused 400 (a prompt too long, the request's fault), a revoked
    key's 401, with its "check the API key", was hidden for a minute (for good while such 400s kept coming).
    Now the status is part of the kind: the 401 is said at once."""
    proxy = FaultProxy("http://127.0.0.1:9").start()  # answers every call itself
    try:
        proxy.set(Fault("status", status=400))
        handle = daemon_factory(cloud_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
        client = handle.client()
        assert client.ask("First?", max_tokens=2).done.outcome == "fallback"
        proxy.set(Fault("status", status=401))
        assert client.ask("Second?", max_tokens=2).done.outcome == "fallback"
    finally:
        proxy.stop()
    said = _lines(handle.log(), "falling back to the local model")
    assert len(said) == 2, said
    assert "HTTP 400" in said[0] and "HTTP 401" in said[1] and "check the API key" in said[1]


def test_a_config_broken_again_after_an_accepted_reload_is_logged(daemon_factory: Any) -> None:
    """Review finding: a rejected reload was throttled per message for a minute across accepted reloads:
    broken, fixed ("configuration reloaded"), then broken the same way again (SIGHUP, which no reply
    answers), and the log's last word was "reloaded" while the file on disk would not start the daemon.
    Now an accepted reload starts the throttle over."""
    handle = daemon_factory({})
    good = handle.config_path.read_text()
    client = handle.client()
    for text, reloaded in (("[routing]\nsla = 9\n", False), (good, True), ("[routing]\nsla = 9\n", False)):
        handle.config_path.write_text(text)
        assert client.reload()["reloaded"] is reloaded
    said = _lines(handle.log(), "reload rejected")
    assert len(said) == 2, said
    assert "got 9" in said[1]


@pytest.fixture
def server() -> Iterator[FileServer]:
    fs = FileServer().start()
    yield fs
    fs.stop()


def _locod_unprivileged(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`locod ARGS` without root's power to read any folder (``setpriv``): as a user would run it."""
    no_dac = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    command = [*no_dac, sys.executable, "-m", "locod.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root reads any folder")
def test_pull_and_rm_in_a_folder_that_cannot_be_read(tmp_path: Path, server: FileServer) -> None:
    """Review finding: ``replace_on_disk`` opened the folder to sync it after the rename, and a folder the
    user may write but not read (mode 0300) raised there: `models pull` said "Permission denied" with the
    model in place and never registered, and `models rm` removed the entry, failed, and left the file,
    which a second `rm` no longer knew ("no such model"). Now such a folder is renamed into unsynced."""
    server.files["m.gguf"] = Served(gguf_bytes(1 << 20))
    models = tmp_path / "models"
    models.mkdir(mode=0o300)
    models.chmod(0o300)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env |= {"LOCOD_MODELS_DIR": str(models), "XDG_CONFIG_HOME": str(tmp_path / "none")}
    env["LOCOD_RUNTIME_DIR"] = str(tmp_path / "run")
    try:
        pull = _locod_unprivileged(env, "models", "pull", f"{server.url}/files/m.gguf", "--name", "tiny")
        assert pull.returncode == 0, pull.stderr
        assert [m.name for m in pulled_models(models)] == ["tiny"]
        removed = _locod_unprivileged(env, "models", "rm", "tiny")
        assert removed.returncode == 0, removed.stderr
        assert pulled_models(models) == [] and not (models / "tiny.gguf").exists()
    finally:
        models.chmod(0o700)
