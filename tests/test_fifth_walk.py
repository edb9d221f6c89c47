"""A fifth new user's walk: a second GGUF, the cloud's key fixed by a reload, the HTTP API from the openai
client, `locod report` against a daemon whose state is elsewhere, and the CLI's small words. Each through
the real CLI, a real daemon, the real llama_cpp.server behind the fault proxy and the real openai client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import REPO, cloud_config, free_port, locod_command, write_config
from .faultproxy import Fault, FaultProxy


def test_a_reload_that_fixes_the_key_is_tried_by_the_next_turn(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    key = tmp_path / "cloud.key"
    key.write_text("sk-the-right-one\n")
    key.chmod(0o600)
    config = cloud_config(proxy.base_url, timeout_s=15.0)  # the loopback cloud under a loaded CI machine
    config["cloud"]["models"][0]["api_key_file"] = str(key)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config["cloud"]["models"].append({"name": "gone", "base_url": dead, "model": "gone"})
    handle = daemon_factory(config)

    proxy.set(Fault("status", status=401, times=3))
    for _ in range(3):  # breaker_failures: the endpoint's breaker opens
        refused = handle.cli("ask", "Hi", "--max-tokens", "2")
        assert refused.returncode == 0, refused.stderr  # answered locally instead
        assert f"HTTP 401 from the endpoint: check the API key, which the daemon takes from api_key_file {key}" in (
            refused.stderr
        )
    assert "breaker open" in handle.cli("status").stdout
    blocked = handle.cli("ask", "Hi", "--max-tokens", "2")
    assert "circuit breaker" in blocked.stderr and len(proxy.seen) == 3  # cooling down: not tried

    assert handle.cli("reload").returncode == 0  # the user fixed the key and reloaded
    assert "breaker closed" in handle.cli("status").stdout
    tried = handle.cli("ask", "Hi", "--max-tokens", "2")
    assert tried.returncode == 0 and "failed" not in tried.stderr and "breaker" not in tried.stderr, tried.stderr
    assert len(proxy.seen) == 4 and handle.rows()[-1]["backend"] == "cloud"
    assert handle.rows()[-1]["tokens_in"] > 0  # "Hi" is a prompt of some tokens, counted or estimated

    proxy.set(Fault("status", status=404, times=1))
    wrong = handle.cli("ask", "Hi", "--max-tokens", "2")
    hint = f"check model = 'cloud-small', the endpoint's model id, and base_url = '{proxy.base_url}'"
    assert f"HTTP 404 from the endpoint: {hint}" in wrong.stderr, wrong.stderr
    down = handle.cli("ask", "Hi", "--max-tokens", "2", "--model", "gone")
    assert f"gone: endpoint {dead} unreachable" in down.stderr, down.stderr


def test_an_editor_plugins_first_calls_through_the_openai_client(daemon_factory: Any) -> None:
    port = free_port()
    daemon_factory(extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("smollm2-135m-instruct").owned_by == "locod-local"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert "the model 'gpt-4o' does not exist" in missing.value.message
    no_v1 = openai.OpenAI(base_url=f"http://127.0.0.1:{port}", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as slipped:  # the usual first slip: base_url without /v1
        no_v1.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "locod serves no POST /chat/completions" in slipped.value.message
    assert "base_url ends in /v1" in slipped.value.message and slipped.value.code == "not_found"
    answer = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.choices[0].message.content
    spelled_out = client.chat.completions.create(  # the defaults, as some plugins send them
        model="auto",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="none",
    )
    assert spelled_out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as scored:  # JSON mode is honoured since (test_walk31.py)
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], logprobs=True)
    assert scored.value.code == "unsupported_parameter"
    with pytest.raises(openai.APIStatusError) as method:
        client.get("/chat/completions", cast_to=object)
    assert method.value.status_code == 405 and method.value.code == "method_not_allowed"


def test_the_cli_as_a_new_user_meets_it(daemon_factory: Any, tmp_path: Path) -> None:
    handle = daemon_factory()
    assert handle.cli("ask", "Hi", "--max-tokens", "2").returncode == 0
    status = handle.cli("status").stdout
    assert "over 1 routed turn," in status and "0 shadow labels and 0 escalation labels" in status, status
    assert "1 sessions" not in status and "1 misses" not in status
    documented = (REPO / "docs/protocol.md").read_text()
    whole = json.loads(handle.cli("status", "--json").stdout)
    named = [k for k in _field_names(whole) if f"`{k}`" not in documented]
    assert not named, f"status fields docs/protocol.md does not name: {named}"

    # The shell's LOCOD_HTTP is not the daemon's; its LOCOD_ROUTING is the same: only the one is named.
    env = {**handle.env, "LOCOD_HTTP": "127.0.0.1:8080", "LOCOD_ROUTING": "auto"}
    reloaded = subprocess.run(
        locod_command("--config", str(handle.config_path), "reload"), capture_output=True, text=True, env=env
    )
    assert reloaded.returncode == 0, reloaded.stderr
    assert "note: $LOCOD_HTTP in this shell is not what the running daemon has" in reloaded.stderr
    assert "LOCOD_ROUTING" not in reloaded.stderr and reloaded.stderr.count("\n") == 1
    assert "note:" not in handle.cli("reload").stderr  # nothing exported: nothing said
    # A cloud model added to the config, its key exported in the shell after the daemon started.
    write_config(handle.config_path, {"cloud": cloud_config("http://127.0.0.1:9/v1", mode="auto")["cloud"]})
    keyed = {**handle.env, "LOCOD_CLOUD_API_KEY": "sk-only-in-this-shell"}
    reloaded = subprocess.run(
        locod_command("--config", str(handle.config_path), "reload"), capture_output=True, text=True, env=keyed
    )
    assert "note: $LOCOD_CLOUD_API_KEY in this shell is not what the running daemon has" in reloaded.stderr
    assert "sk-only-in-this-shell" not in reloaded.stderr + reloaded.stdout

    for limit in ("0", "-1", "1001"):
        refused = handle.cli("decisions", "--limit", limit)
        assert refused.returncode == 2 and "must be between 1 and 1000" in refused.stderr, refused.stderr
    with handle.client() as raw, pytest.raises(Exception, match="limit"):
        raw.decisions(0)  # over the socket too: 0 is refused, not read as the default

    # `locod report` from a shell whose own state directory is elsewhere (a service's $STATE_DIRECTORY, a
    # systemd user unit's): it draws the running daemon's log.
    shell = {k: v for k, v in handle.env.items() if k != "LOCOD_STATE_DIR"}
    shell.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "elsewhere"))
    out = tmp_path / "report.html"
    drawn = subprocess.run(
        locod_command("--config", str(handle.config_path), "report", "--out", str(out)),
        capture_output=True,
        text=True,
        env=shell,
        cwd=tmp_path,
    )
    assert drawn.returncode == 0, drawn.stderr
    assert out.stat().st_size > 0 and not (tmp_path / "elsewhere" / "locod").exists()


def test_help_names_xdg_config_home_and_the_user_unit_keeps_state_where_the_cli_reads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    helped = subprocess.run(locod_command("--help"), capture_output=True, text=True, env=env).stdout
    assert "$XDG_CONFIG_HOME/locod/config.toml" in " ".join(helped.split())
    trained = subprocess.run(locod_command("policy", "train", "--help"), capture_output=True, text=True, env=env)
    assert "--from-db LOCOD.DB" in trained.stdout and "LOCOD_DB" not in trained.stdout  # a file, not a variable
    # Before systemd 254 a user unit's StateDirectory= is under $XDG_CONFIG_HOME: the daemon would keep its
    # log in ~/.config/locod while `locod report` and `decisions` read ~/.local/state/locod.
    unit = (REPO / "systemd/user/locod.service").read_text()
    assert not [line for line in unit.splitlines() if line.startswith("StateDirectory")]
    rows = json.loads(
        subprocess.run(
            locod_command("config", "show", "--json"),
            capture_output=True,
            text=True,
            env={**env, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "c")},
        ).stdout
    )
    assert rows["paths"]["state_dir"] == str(tmp_path / ".local/state/locod")


def test_a_second_gguf_under_a_path_with_spaces_and_a_tilde(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / "my models").mkdir(parents=True)
    try:
        os.link(model_path, home / "my models" / "Other Model.gguf")
    except OSError:  # another filesystem
        shutil.copyfile(model_path, home / "my models" / "Other Model.gguf")
    config = {"local": {"default": "other", "models": [{"name": "other", "path": "~/my models/Other Model.gguf"}]}}
    handle = daemon_factory(config, extra_env={"HOME": str(home)})
    asked = handle.cli("ask", "Hi", "--model", "other", "--max-tokens", "2")
    assert asked.returncode == 0, asked.stderr
    assert handle.rows()[-1]["model"] == "other"
    listed = json.loads(handle.cli("models", "list", "--json").stdout)
    other = next(m for m in listed if m["name"] == "other")
    assert other["path"] == str(home / "my models" / "Other Model.gguf") and other["default"] and other["loaded"]

    pulled = handle.cli("models", "pull", "~/my models/Other Model.gguf")  # a file on disk is not downloaded
    assert pulled.returncode != 0 and "a GGUF already on disk needs no pull" in pulled.stderr, pulled.stderr
    assert "[[local.models]]" in pulled.stderr


def _field_names(status: dict[str, Any], where: str = "") -> list[str]:
    """Every key of ``status``, nested ones too, but not the keys of its maps (model names, URLs, signals),
    whose values' own keys are fields again (``routing.predictors.<model>.prior``)."""
    maps = ("telemetry.missing.", "cloud.breakers.", "cloud.no_api_key.", "routing.labels.", "routing.predictors.")
    out = []
    for key, value in status.items():
        out.append(key)
        if not isinstance(value, dict):
            continue
        if f"{where}{key}." not in maps:
            out += _field_names(value, f"{where}{key}.")
        else:
            out += [k for entry in value.values() if isinstance(entry, dict) for k in _field_names(entry, "")]
    return out


def test_the_user_install_names_the_venv_it_made_under_xdg_data_home(tmp_path: Path) -> None:
    """scripts/install.sh --user puts the venv in $XDG_DATA_HOME/locod/venv; the unit named
    ~/.local/share/locod/venv whatever that was. The venv's python and locod are stand-ins here (the
    script's pip and fetch steps are the real ones' calls, answered at once), so the script itself runs."""
    home, data = tmp_path / "home", tmp_path / "data dir"
    venv = data / "locod" / "venv"
    (venv / "bin").mkdir(parents=True)
    no_daemon = '[ "$1" = status ] && exit 5'  # as locod's status exits when no daemon answers
    for name, body in (("python", "exit 0"), ("locod", f'{no_daemon}\necho "locod 0.1.0"')):
        (venv / "bin" / name).write_text(f"#!/bin/sh\n{body}\n")
        (venv / "bin" / name).chmod(0o755)
    env = {"HOME": str(home), "XDG_DATA_HOME": str(data), "PATH": "/usr/bin:/bin"}
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    installed = subprocess.run(
        ["bash", str(REPO / "scripts/install.sh"), "--user"], capture_output=True, text=True, env=env
    )
    assert installed.returncode == 0, installed.stderr
    unit = home / ".config/systemd/user/locod.service"
    assert f'ExecStart="{venv}/bin/locod" serve' in unit.read_text()
    assert f'ExecReload="{venv}/bin/locod" reload' in unit.read_text()  # attack 20's ExecReload named the default
    if not Path("/run/systemd/system").is_dir():  # a container, a chroot: the user is told how to run it anyway
        assert f'run the daemon by hand with "{venv}/bin/locod" serve' in installed.stderr, installed.stderr
    if shutil.which("systemd-analyze"):
        runtime = tmp_path / "xdg"
        runtime.mkdir(mode=0o700)
        verified = subprocess.run(
            ["systemd-analyze", "--user", "verify", str(unit)],
            capture_output=True,
            text=True,
            env={**env, "XDG_RUNTIME_DIR": str(runtime)},
        )
        assert verified.returncode == 0, verified.stderr


def test_a_second_model_whose_file_is_missing_is_left_out_of_routing(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """A typo in a second model's path made every auto turn routed to it fail (5 of 12 in the walk, with
    exploration). It is masked instead, said once in the log, and offered again once its file is there."""
    later = tmp_path / "later.gguf"
    config = {
        "routing": {"explore_c": 100.0},  # every turn explores: a model on offer would be picked
        "local": {"models": [{"name": "typo", "path": str(later)}]},
    }
    handle = daemon_factory(config)
    for i in range(6):
        asked = handle.cli("ask", f"Hi {i}", "--max-tokens", "2")
        assert asked.returncode == 0, asked.stderr
    rows = handle.rows()
    assert all(r["outcome"] == "ok" and r["model"] == "smollm2-135m-instruct" for r in rows)
    assert all(json.loads(r["mask"])["typo"] is False for r in rows)
    assert handle.log().count("local model 'typo' is left out of routing") == 1
    missing = handle.cli("ask", "Hi", "--model", "typo", "--max-tokens", "2")  # named: refused by name
    assert missing.returncode == 3 and f"file {later} not found" in missing.stderr, missing.stderr

    try:
        os.link(model_path, later)
    except OSError:
        shutil.copyfile(model_path, later)
    assert handle.cli("ask", "Hi again", "--max-tokens", "2").returncode == 0
    assert json.loads(handle.rows()[-1]["mask"])["typo"] is True  # its file is there: on offer again


def test_an_unreachable_endpoint_is_named_without_the_credentials_its_url_may_carry() -> None:
    from locod.daemon.config import CloudModelConfig, redacted_url

    named = redacted_url(CloudModelConfig(name="a", base_url="http://user:sk-secret@[::1]:8080/v1", model="m").base_url)
    assert named == "http://[::1]:8080/v1"


def test_config_show_of_a_file_that_does_not_load_says_only_what_is_wrong_with_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[routing]\nsla = 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(HOME=str(tmp_path), LOCOD_RUNTIME_DIR=str(tmp_path / "run"))  # no daemon there
    shown = subprocess.run(
        locod_command("--config", str(config), "config", "show"), capture_output=True, text=True, env=env
    )
    assert shown.returncode == 2
    assert shown.stderr == f"locod: {config}: routing.sla must be between 0.0 and 1.0, got 3\n"  # as written
