"""Round six of attacks on a running daemon: each test is one way in that broke, and now holds."""

from __future__ import annotations

import shutil
from pathlib import Path

from .conftest import start_daemon


def test_a_model_file_truncated_while_loaded_does_not_kill_the_daemon(tmp_path: Path, model_path: Path) -> None:
    """`cp` or a download over a loaded GGUF truncates it in place. A memory-mapped model then died of
    SIGBUS at its next token, taking every client and turn with it; a model read into memory answers on."""
    models = tmp_path / "models"
    models.mkdir()
    copy = models / model_path.name
    shutil.copyfile(model_path, copy)
    handle = start_daemon(tmp_path / "d", models)
    try:
        client = handle.client()
        assert client.ask("Say hi.", max_tokens=4).done is not None
        with copy.open("r+b") as f:
            f.truncate(1 << 20)
        assert client.ask("Say hello.", max_tokens=4).done is not None
        assert client.ping()["pong"] and handle.proc.poll() is None
    finally:
        handle.stop()
