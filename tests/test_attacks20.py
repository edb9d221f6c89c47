"""Attack round 20: reloads under load and hostile configuration. A reload whose config named a key file or
the policy by a path holding a NUL character answered "internal error" (os.open's ValueError escaped the
validator); routing weights of 1e308, in range, were taken, and every decision after priced its actions
``NaN`` (an invalid JSON number in `locod decisions --json`); a reload to ``n_ctx = 1048576`` for the
embedded model, in range, had the next turn allocate its 24 GiB KV cache and the OOM killer end the daemon.
One real daemon (the embedded model) serves each test."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import DaemonHandle, free_port, write_config

BASE: dict[str, Any] = {"routing": {"mode": "local"}}


def reload_with(daemon: DaemonHandle, config: dict[str, Any]) -> Any:
    write_config(daemon.config_path, config)
    return daemon.cli("reload", timeout=120)


def config_shown(daemon: DaemonHandle) -> dict[str, Any]:
    done = daemon.cli("config", "show", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("key", "section"),
    [
        ("routing.policy_path", {"routing": {"mode": "local", "policy_path": "/tmp/policy\0.onnx"}}),
        (
            "cloud.models[0].api_key_file",
            {
                "routing": {"mode": "local"},
                "cloud": {
                    "models": [
                        {"name": "c", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_file": "/tmp/k\0ey"}
                    ]
                },
            },
        ),
    ],
)
def test_a_reload_naming_a_path_with_a_nul_is_refused_by_key_and_the_old_config_kept(
    daemon_factory: Any, key: str, section: dict[str, Any]
) -> None:
    daemon = daemon_factory(BASE)
    before = config_shown(daemon)
    done = reload_with(daemon, section)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert f"{daemon.config_path}: {key} must not hold a NUL character" in done.stderr, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in daemon.log()
    assert config_shown(daemon) == before
    assert daemon.cli("ask", "Hi", "--max-tokens", "3", timeout=300).returncode == 0


def test_routing_weights_that_overflow_are_refused_at_reload_and_decisions_stay_finite(daemon_factory: Any) -> None:
    daemon = daemon_factory(BASE)
    hostile = {"routing": {"mode": "auto", "weight_money": 1e308, "weight_energy": 1e308}}
    done = reload_with(daemon, hostile)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"{daemon.config_path}: routing.weight_money must be between 0.0 and 1000000.0, got 1e+308" in done.stderr
    assert config_shown(daemon)["routing"]["weight_energy"] == 0.2
    done = reload_with(daemon, {"routing": {"mode": "auto", "weight_energy": 1e6}})  # the most there is: taken
    assert done.returncode == 0, done.stderr
    assert daemon.cli("ask", "What is two and two?", "--max-tokens", "3", timeout=300).returncode == 0
    done = daemon.cli("decisions", "--json", "--limit", "1", timeout=120)
    row = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"{name} in a decision"))[0]
    assert row["location"] == "local"


def test_a_reload_to_a_context_the_memory_cannot_hold_fails_its_turns_by_name_and_the_daemon_serves_on(
    daemon_factory: Any, tmp_path: Any
) -> None:
    """The system has 1 GiB left (telemetry.procfs_root's meminfo stands for it); a 65536-token context of
    the embedded model takes about 1.5 GiB. Taken at face value, as a 1048576-token one (24 GiB) was, the
    load leaves the OOM killer to end the daemon."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal: 2097152 kB\nMemAvailable: 1048576 kB\n")
    port = free_port()
    config: dict[str, Any] = {
        "routing": {"mode": "local"},
        "telemetry": {"procfs_root": str(proc)},
        "http": {"listen": f"127.0.0.1:{port}"},
    }
    daemon = daemon_factory(config)
    long = {"name": "smollm2-135m-instruct", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 65536}
    done = reload_with(daemon, {**config, "local": {"models": [long]}})
    assert done.returncode == 0, done.stderr
    done = daemon.cli("ask", "Hi", "--max-tokens", "3", timeout=300)
    assert done.returncode != 0, done.stdout
    assert "model 'smollm2-135m-instruct' needs about" in done.stderr, done.stderr
    assert "65536-token KV cache), but 1024 MiB of memory is available: lower its n_ctx" in done.stderr
    body = json.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:  # unavailable as a missing file is: no retrying
        urllib.request.urlopen(request, timeout=300)
    assert refused.value.code == 404 and json.load(refused.value)["error"]["code"] == "model_too_large"
    assert daemon.proc.poll() is None
    assert daemon.rows() == []  # refused before it was accepted, as a turn whose model file is missing is
    assert daemon.cli("status", timeout=120).returncode == 0
    assert reload_with(daemon, config).returncode == 0  # the model as it was: answered again
    assert daemon.cli("ask", "Hi", "--max-tokens", "3", timeout=300).returncode == 0
    assert [row["outcome"] for row in daemon.rows()] == ["ok"]


def test_a_reload_changing_the_disk_park_says_it_waits_for_a_restart_and_shows_the_size_in_force(
    daemon_factory: Any,
) -> None:
    """local.cache_disk_mb is read at start (the park is opened with its size): a reload said only "reloaded",
    and `config show` showed the new size, which nothing used."""
    daemon = daemon_factory(BASE)
    done = reload_with(daemon, {**BASE, "local": {"cache_disk_mb": 64}})
    assert done.returncode == 0, done.stderr
    assert "changed in [local.cache_disk_mb]: takes effect when the daemon restarts" in done.stdout, done.stdout
    assert config_shown(daemon)["local"]["cache_disk_mb"] == 0
    assert daemon.cli("ask", "Hi", "--max-tokens", "3", timeout=300).returncode == 0


def test_a_reload_with_thousands_of_models_is_refused_before_the_router_state_grows_by_them(
    daemon_factory: Any,
) -> None:
    """Each model is a 32 kB MESS+ predictor in the router's state, saved after every turn: 22,000 entries
    (870 kB of TOML, under the 1 MiB a config may be) made it 725 MB, and every turn took seconds."""
    daemon = daemon_factory(BASE)
    many = [{"name": f"m{i}", "path": "SmolLM2-135M-Instruct.Q4_1.gguf"} for i in range(200)]
    done = reload_with(daemon, {**BASE, "local": {"models": many}})
    assert done.returncode == 2, done.stdout
    assert f"{daemon.config_path}: local.models must hold at most 128 models, got 201" in done.stderr, done.stderr
    assert len(config_shown(daemon)["local"]["models"]) == 1
    assert daemon.cli("ask", "Hi", "--max-tokens", "3", timeout=300).returncode == 0


def test_reloads_that_rename_the_models_leave_no_predictors_of_the_old_names_behind(daemon_factory: Any) -> None:
    """Under the cap, a reload that renamed the cloud models kept the old names' predictors (their priors,
    never trained) in the router's state: each such reload added 128 x 32 kB to the file saved every turn."""
    daemon = daemon_factory(BASE)
    for batch in "abc":
        cloud = [{"name": f"{batch}{i}", "base_url": "http://127.0.0.1:9/v1", "model": "m"} for i in range(100)]
        assert reload_with(daemon, {**BASE, "cloud": {"models": cloud}}).returncode == 0
    assert daemon.stop() == 0  # the state is saved as the daemon stops
    with np.load(daemon.home / "state" / "messplus.npz") as state:
        names = {str(name) for name in state["names"]}
    assert names == {"smollm2-135m-instruct", *(f"c{i}" for i in range(100))}


@pytest.mark.parametrize(
    ("url", "why"), [("http://[zz/v1", "(Invalid IPv6 URL)"), ("http://localhost:99999/v1", "(Port out of range")]
)
def test_a_reload_to_a_base_url_that_does_not_parse_is_refused_by_key(daemon_factory: Any, url: str, why: str) -> None:
    """It passed the check of its scheme, and the cloud client built from it raised ValueError: the reload
    answered "internal error" (and a start, a traceback)."""
    daemon = daemon_factory(BASE)
    cloud = {"models": [{"name": "c", "base_url": url, "model": "m"}]}
    done = reload_with(daemon, {**BASE, "cloud": cloud})
    assert done.returncode == 2, (done.returncode, done.stderr)
    expected = f"{daemon.config_path}: cloud model 'c': base_url must be an http(s) URL, such as"
    assert expected in done.stderr and f"got a URL that does not parse {why}" in done.stderr, done.stderr
    assert config_shown(daemon)["cloud"]["models"] == []


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"http": {"cors_origins": ["http://[zz"]}}, "http.cors_origins holds 'http://[zz', not an origin"),
        (
            {"local": {"hub_endpoint": "http://[zz"}},
            "local.hub_endpoint must be an http(s) URL, got a URL that does not",
        ),
    ],
)
def test_a_reload_to_an_address_that_does_not_parse_is_refused_by_key(
    daemon_factory: Any, section: dict[str, Any], expected: str
) -> None:
    """urlsplit raised ValueError inside the validator (the reload answered "internal error"), or later, in
    `locod models pull`: the reload took it."""
    daemon = daemon_factory(BASE)
    done = reload_with(daemon, {**BASE, **section})
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"{daemon.config_path}: {expected}" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("unit", "installed"),
    [("locod.service", "/opt/locod/venv/bin/locod"), ("user/locod.service", "%h/.local/share/locod/venv/bin/locod")],
)
def test_systemctl_reload_of_a_rejected_config_fails_saying_why(daemon_factory: Any, unit: str, installed: str) -> None:
    """The units' ExecReload sent SIGHUP: `systemctl reload` succeeded whatever the daemon made of it, and a
    rejected config was said in the journal only. The unit's command is run as systemd runs it (this
    environment's locod for the installed one, the daemon's pid for $MAINPID)."""
    daemon = daemon_factory(BASE)
    text = (Path(__file__).parents[1] / "systemd" / unit).read_text()
    line = next(line for line in text.splitlines() if line.startswith("ExecReload="))
    locod = str(Path(sys.executable).with_name("locod"))
    command = line.removeprefix("ExecReload=").replace(installed, locod).replace("$MAINPID", str(daemon.proc.pid))
    daemon.config_path.write_text("[routing]\nsla = 9\n")
    env = {**daemon.env, "LOCOD_CONFIG": str(daemon.config_path)}  # where the unit's daemon finds it by itself
    done = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (command, done.returncode, done.stderr)
    assert "reload rejected" in done.stderr and "routing.sla must be between 0.0 and 1.0, got 9" in done.stderr
    assert daemon.cli("ask", "Hi", "--max-tokens", "3", timeout=300).returncode == 0


def test_a_reload_to_a_default_model_cut_short_is_refused_as_a_start_with_it_is(
    daemon_factory: Any, models_dir: Path, tmp_path: Path
) -> None:
    """A copy of the model stopped halfway: its header is whole, so the reload took it as local.default and
    every local turn after failed "llama.cpp could not load" (a start with it fails)."""
    daemon = daemon_factory(BASE)
    data = (models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    half = tmp_path / "half.gguf"
    half.write_bytes(data[: len(data) // 2])
    done = reload_with(daemon, {**BASE, "local": {"default": "half", "models": [{"name": "half", "path": str(half)}]}})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"reload rejected, the running configuration kept: model 'half': {half} is cut short: " in done.stderr
    assert config_shown(daemon)["local"]["default"] == "smollm2-135m-instruct"
    assert daemon.cli("ask", "Hi", "--max-tokens", "3", timeout=300).returncode == 0


def test_a_model_the_memory_cannot_hold_is_refused_without_unloading_the_one_answering(
    daemon_factory: Any, tmp_path: Any
) -> None:
    """The memory check ran after room was made for the load: `--model long` (a 65536-token context, about
    1.5 GiB, with 1 GiB available) unloaded the default model first and was refused for nothing, and the next
    turn reloaded the default from disk."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal: 2097152 kB\nMemAvailable: 1048576 kB\n")
    long = {"name": "long", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 65536}
    config = {
        "routing": {"mode": "local"},
        "telemetry": {"procfs_root": str(proc)},
        "local": {"models": [long], "memory_budget_mb": 1024},
    }
    daemon = daemon_factory(config)
    assert daemon.cli("ask", "Hi", "--max-tokens", "2", timeout=300).returncode == 0
    resident = daemon.client().status()["local"]["resident"]
    refused = daemon.cli("ask", "Hi", "--model", "long", "--max-tokens", "2", timeout=300)
    assert refused.returncode != 0 and "with the loaded models unloaded): lower its n_ctx" in refused.stderr
    assert daemon.client().status()["local"]["resident"] == resident != []


def test_routing_passes_by_a_model_the_memory_cannot_hold_and_says_so(daemon_factory: Any, tmp_path: Any) -> None:
    """A second local model refused as too large for the memory stayed on offer: routing could pick it turn
    after turn, each failing. Now it is passed by while the memory stays short, and the decision says why."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal: 2097152 kB\nMemAvailable: 1048576 kB\n")
    long = {"name": "long", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 65536}
    config = {"telemetry": {"procfs_root": str(proc)}, "local": {"models": [long]}}  # auto: the router picks
    daemon = daemon_factory(config)
    refused = daemon.cli("ask", "Hi", "--model", "long", "--max-tokens", "2", timeout=300)
    assert refused.returncode != 0 and "model 'long' needs about" in refused.stderr, refused.stderr

    def reason() -> str:
        asked = daemon.cli("ask", "Hi", "--max-tokens", "2", "--json", timeout=300)
        assert asked.returncode == 0, asked.stderr
        return str(next(f for f in map(json.loads, asked.stdout.splitlines()) if f["type"] == "decision")["reason"])

    assert "not on offer: long (too large for the memory available)" in reason()
    (proc / "meminfo").write_text("MemTotal: 8388608 kB\nMemAvailable: 6291456 kB\n")  # room again: offered again
    assert "not on offer: long" not in reason()
