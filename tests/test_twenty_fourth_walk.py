"""A twenty-fourth new user's walk: someone whose apps speak OpenAI, taking locod as a drop-in local endpoint
on a laptop, then running it as a service and pointing it at their own GGUFs. Each against a real daemon
with the real model, the real `openai` SDK and the real `locod` command."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from . import conftest
from .conftest import MODEL_NAME, free_port, write_config
from .test_pull import _clean_env, _run

# Root reads any file whatever its mode: the daemon runs without the capabilities that let it (a service's
# user reads only what it is allowed to).
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


GGUF_HINT = """a GGUF file is not a model's name: name it in the config, [[local.models]] name = "...", path ="""


def _without_root_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        return
    if shutil.which("setpriv") is None:
        pytest.skip("root reads every file, and setpriv (util-linux), to run the daemon without that, is not here")
    monkeypatch.setattr(conftest, "locod_command", lambda *args: [*NO_DAC, sys.executable, "-m", "locod.cli", *args])


def test_a_model_file_the_daemon_may_not_read_is_left_out_by_name(
    daemon_factory: Any, tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Walk finding: a second [[local.models]] file the daemon's user could not read (a GGUF under /opt left
    0600 by root, for the system service's user) stopped the start with "locod: PATH: Permission denied"
    (exit 1, naming no model) when it had the size of a shipped prior's model, and otherwise failed every
    turn and `locod status` alike with "internal error: PermissionError". Now it is left out of routing, as
    a missing file is, and naming it says why and what to do. A path to a directory said "not found"."""
    _without_root_reads(monkeypatch)
    locked = tmp_path / "locked.gguf"
    with locked.open("wb") as f:
        f.truncate(model_path.stat().st_size)  # the embedded model's size: its shipped prior is looked up
    locked.chmod(0)
    small = tmp_path / "small.gguf"
    small.write_bytes(model_path.read_bytes()[: 1 << 20])
    small.chmod(0)
    (tmp_path / "folder.gguf").mkdir()
    models = [{"name": name, "path": str(tmp_path / f"{name}.gguf")} for name in ("locked", "small", "folder")]
    handle = daemon_factory({"local": {"models": models}})

    assert handle.client().ask("Say hi", max_tokens=4).done.outcome == "ok"
    status = handle.client().status()
    assert status["local"]["unavailable"] == {
        "locked": "model_missing",
        "small": "model_missing",
        "folder": "model_missing",
    }
    asked = handle.cli("ask", "--model", "locked", "Say hi")
    assert asked.returncode == 3, asked.stderr
    assert f"model 'locked': cannot read {locked} (Permission denied); make it readable by the user" in asked.stderr
    folder = handle.cli("ask", "--model", "folder", "Say hi")
    assert folder.returncode == 3 and "folder.gguf is not a file (name the .gguf file itself)" in folder.stderr
    listed = handle.cli("models", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert "unreadable" in rows["locked"] and "unreadable" in rows["small"], listed.stdout


def test_models_list_says_a_copy_cut_short(tmp_path: Path, model_path: Path) -> None:
    """Walk finding: `locod status` says "left out, no usable file (`locod models list`)" of a GGUF copy
    stopped midway, and `locod models list` showed it as a whole model (its quantisation, its context and the
    memory it would take): it read the header alone, where the daemon checks that the file reaches its last
    tensor."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    config = write_config(tmp_path / "config.toml", {"local": {"models": [{"name": "cut", "path": str(cut)}]}})
    env = {**_clean_env(), "LOCOD_MODELS_DIR": str(model_path.parent), "LOCOD_RUNTIME_DIR": str(tmp_path / "run")}
    listed = _run(env, "--config", str(config), "models", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("cut "))
    assert row.split()[2:4] == ["cut", "short"] and "Q4_1" not in row, listed.stdout
    embedded = next(line for line in listed.stdout.splitlines() if line.startswith(MODEL_NAME))
    assert "Q4_1" in embedded


def test_no_model_may_be_named_auto(tmp_path: Path, model_path: Path) -> None:
    """Walk finding: a [[local.models]] entry named "auto" was taken: /v1/models listed "auto" twice, and an
    OpenAI client's model "auto" was routed, so that model could never be named over HTTP. And a GGUF's path
    as local.default was refused with the names there are, not how a file becomes one."""
    config = write_config(tmp_path / "config.toml", {"local": {"models": [{"name": "auto", "path": str(model_path)}]}})
    env = {**_clean_env(), "LOCOD_MODELS_DIR": str(tmp_path / "models"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    shown = _run(env, "--config", str(config), "config", "show", "--new")
    assert shown.returncode == 2, shown.stdout
    assert "a model may not be named 'auto': an OpenAI client's model 'auto' asks locod to route" in shown.stderr
    by_path = _run(env, "--set", f"local.default={model_path}", "config", "show", "--new")
    assert by_path.returncode == 2 and GGUF_HINT in by_path.stderr, by_path.stderr
    # nor pulled under that name: registered, it would stop every start of the daemon
    pulled = _run(env, "models", "pull", f"http://127.0.0.1:{free_port()}/auto.gguf")
    assert pulled.returncode == 1 and "model name 'auto' means 'let locod route'" in pulled.stderr, pulled.stderr


def test_refusals_say_what_is_not_supported_and_what_to_send(daemon_factory: Any) -> None:
    """Walk finding: `n=2` was refused with "'n' must be 1, got 2", a tool's answer (role "tool") with
    "must be an object with a role in [...]" and an audio part with "must be a text or image_url part":
    the first said nothing of what to do instead, the others not what was unsupported. A GGUF's path sent as
    the model (as a llama.cpp server takes it) was told the names there are, not how a file becomes one."""
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    hi = {"role": "user", "content": "Say hi"}

    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(model="auto", messages=[hi], n=2)
    assert (n.value.code, n.value.param) == ("unsupported_parameter", "n")
    assert "locod writes one choice per request; send n=1 (or none), and ask again" in n.value.message

    called = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
              "function": {"name": "weather", "arguments": "{}"}}]}  # fmt: skip
    tool = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model="auto", messages=[hi, called, tool])  # type: ignore[list-item]
    assert role.value.param == "messages[2]"
    assert 'role "tool" is not supported by locod, which calls no tools' in role.value.message

    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as part:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": [audio]}])  # type: ignore[list-item]
    assert part.value.param == "messages[0].content[0]"
    assert 'a part of type "input_audio" is not supported by locod; send text and image_url parts' in part.value.message

    # a GGUF's path where a model's name goes: how a file becomes a model, not only the names there are
    with pytest.raises(openai.NotFoundError) as path:
        client.chat.completions.create(model="/home/me/models/qwen2.5-7b.Q4_K_M.gguf", messages=[hi])
    assert path.value.code == "model_not_found" and GGUF_HINT in path.value.message, path.value.message
    asked = handle.cli("ask", "--model", "qwen2.5-7b.Q4_K_M.gguf", "Say hi")
    assert asked.returncode == 1 and GGUF_HINT in asked.stderr, asked.stderr

    as_text = {"type": "image_url", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    with pytest.raises(openai.BadRequestError) as image:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": [as_text]}])  # type: ignore[list-item]
    assert 'messages[0].content[0].image_url must be an object, {"url": "data:' in image.value.message
