"""An eighth new user's walk: someone who brings their own GGUF and their own cloud, and runs locod as a
service they operate (backups, a full disk, key rotation), integrating over the socket from another
language. Each through the real `locod` command, a real daemon with the real model, a real loopback file
server and a real tmpfs."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from .conftest import locod_command
from .fileserver import FileServer, Served, gguf_bytes


def locod(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120)


def test_a_pull_from_a_plain_url_says_its_checksum_was_not_checked(tmp_path: Path) -> None:
    """Walk finding: `locod models pull http://.../model.gguf` (the README: "checks the GGUF header and the
    SHA-256") said only "installed at ...": from a plain URL nothing publishes a SHA-256, so none was
    checked, and nothing said so; the user took a file from their own server for a verified one."""
    data = gguf_bytes(1 << 20)
    digest = hashlib.sha256(data).hexdigest()
    server = FileServer({"mine.gguf": Served(data), "again.gguf": Served(data)}).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
        env.update(LOCOD_MODELS_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "none"))
        env["LOCOD_RUNTIME_DIR"] = str(tmp_path / "run")
        pulled = locod(env, "models", "pull", f"{server.url}/files/mine.gguf")
        assert pulled.returncode == 0, pulled.stderr
        assert f"mine: its SHA-256 is {digest}, not checked" in pulled.stderr, pulled.stderr
        assert "--sha256" in pulled.stderr
        checked = locod(env, "models", "pull", f"{server.url}/files/again.gguf", "--sha256", digest)
        assert checked.returncode == 0, checked.stderr
        assert "not checked" not in checked.stderr, checked.stderr
    finally:
        server.stop()
