"""What a new user hits first, through the real CLI in a subprocess and a real daemon: a stopped daemon is
reported at once, long prompts go where they fit, one endpoint's failures stay its own, training takes its
options, errors are one line, and the user is told when an answer did not come from where they asked."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tomllib

from locod.client import Client
from locod.errors import DaemonNotRunning, LocodError
from locod.protocol import DecisionFrame, DeltaFrame

from .conftest import REPO, DaemonHandle, cloud_config, free_port, locod_command
from .faultproxy import Fault, FaultProxy


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_clients_learn_at_once_that_a_stopped_daemon_is_gone(daemon_factory: Any) -> None:
    handle = daemon_factory()
    client = handle.client()
    assert client.ping()["pong"]
    handle.stop(signal.SIGTERM)
    assert not (handle.home / "run" / "locod.sock").exists()  # a clean stop removes its socket
    started = time.monotonic()
    with pytest.raises(DaemonNotRunning):
        client.ask("hi", max_tokens=2)
    result = handle.cli("ask", "hi", timeout=20)
    assert time.monotonic() - started < 15  # not the 600 s turn timeout (behaviour, with room for a slow VM)
    one_line_error(result, 5, "locod is not running", "locod serve")


def test_a_stale_socket_file_is_recognised(daemon_factory: Any) -> None:
    handle = daemon_factory()
    handle.stop(signal.SIGKILL)  # kill -9 cannot clean up: the socket file stays
    assert (handle.home / "run" / "locod.sock").exists()
    with pytest.raises(DaemonNotRunning) as info:
        Client(handle.endpoint)
    assert "not running" in info.value.message
    one_line_error(handle.cli("status", timeout=20), 5, "locod is not running")


def test_a_prompt_longer_than_the_local_context_goes_to_the_cloud(daemon_factory: Any, proxy: FaultProxy) -> None:
    config = cloud_config(proxy.base_url, mode="auto", timeout_s=60.0)
    config["routing"]["explore_c"] = 0.0
    local = {"name": "smollm2-135m-instruct", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 256}
    config["local"] = {"models": [local]}
    handle = daemon_factory(config)
    client = handle.client()
    long_prompt = "Here is a list: " + "apple " * 300 + "\nWhat fruit is in the list? Answer in one sentence."
    frames = client.chat(long_prompt, max_tokens=12, temperature=0.0)  # about 310 tokens: over the local 256
    decision = next(frames)
    assert isinstance(decision, DecisionFrame) and decision.location == "cloud"
    with contextlib.suppress(LocodError):  # what a tiny model answers to it is not the point here
        list(frames)
    row = handle.rows()[-1]
    assert '"smollm2-135m-instruct":false' in row["mask"].replace(" ", "")
    # with the cloud's own context too small as well, it is refused, naming the sizes
    small = cloud_config(proxy.base_url, mode="auto")
    small["cloud"]["models"][0]["context_tokens"] = 300
    small["local"] = config["local"]
    refused = daemon_factory(small, name="small").cli("ask", long_prompt)
    one_line_error(refused, 1, "the prompt needs about", "largest configured context is 300")


def test_one_endpoints_failures_do_not_block_another(daemon_factory: Any, proxy: FaultProxy) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = cloud_config(proxy.base_url, breaker_failures=1, timeout_s=60.0)
    config["cloud"]["models"].append({"name": "dead", "base_url": dead, "model": "x"})
    handle = daemon_factory(config)
    client = handle.client()
    assert client.ask("Hi", model="dead", max_tokens=2).done.outcome == "fallback"
    status = client.status()["cloud"]
    assert status["breakers"][dead] == "open" and status["breakers"][proxy.base_url] == "closed"
    healthy = client.ask("Hi", model="cloud-small", max_tokens=2)
    assert healthy.decision.location == "cloud" and healthy.done.outcome == "ok"
    blocked = client.ask("Hi", model="dead", max_tokens=2)
    assert blocked.decision.location == "local" and "dead's endpoint is open" in (blocked.decision.notice or "")


def test_overrides_that_were_not_honoured_are_said(daemon_factory: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    handle = daemon_factory(cloud_config(proxy.base_url, daily_cap_usd=1e-9, timeout_s=60.0))
    assert handle.cli("ask", "Hi", "--max-tokens", "2").returncode == 0  # spends past the tiny cap
    capped = handle.cli("ask", "Hi", "--force", "cloud", "--max-tokens", "2")
    assert capped.returncode == 0 and "answered locally" in capped.stderr and "cap" in capped.stderr
    photo = tmp_path / "photo.png"
    photo.write_bytes(cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes())
    local = handle.cli("ask", "What is in this photo?", "--attach", str(photo), "--force", "local", "--max-tokens", "2")
    assert "cannot see images; not seen: photo.png" in local.stderr


def test_a_cut_cloud_stream_restarts_the_answer_and_bills_an_estimate(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(cloud_config(proxy.base_url, timeout_s=60.0))
    proxy.set(Fault("cut", cut_after_chunks=6))
    result = handle.client().ask("Tell me about the sea.", max_tokens=24, temperature=0.0)
    assert result.fallback is not None and "from the start" in result.fallback.message
    cut = result.frames.index(result.fallback)
    cloud_text = "".join(f.text for f in result.frames[:cut] if isinstance(f, DeltaFrame))
    local_text = "".join(f.text for f in result.frames[cut:] if isinstance(f, DeltaFrame))
    assert cloud_text and result.text == local_text  # the answer restarts: the cloud's part is not kept
    assert result.done.cost_estimated and result.done.cost_usd > 0
    row = handle.rows()[-1]
    assert row["cost_usd"] > 0 and row["cost_estimated"] == 1 and row["outcome"] == "fallback"


def test_policy_train_takes_its_options_and_writes_to_the_state_dir(daemon_factory: Any) -> None:
    handle = daemon_factory()
    helped = handle.cli("policy", "train", "--help")
    assert helped.returncode == 0 and "--steps" in helped.stdout and "--from-db" in helped.stdout
    too_few = handle.cli("policy", "train", "--steps", "512", "--from-db", str(handle.db_path))
    one_line_error(too_few, 1, "too few labels", "locod feedback")
    trained = handle.cli("policy", "train", "--steps", "2048", "--seed", "3", timeout=600)
    assert trained.returncode == 0, trained.stderr
    out = handle.home / "state" / "policy.onnx"
    assert out.is_file() and str(out) in trained.stdout
    assert handle.cli("reload").returncode == 0
    version = handle.client().status()["routing"]["policy"]
    assert version.startswith("rcppo-s3-2k")  # routing.policy_path unset: the trained policy is the one used


def test_file_problems_are_one_line_errors(daemon: DaemonHandle, tmp_path: Path) -> None:
    one_line_error(daemon.cli("ask", "hi", "--attach", str(tmp_path / "nope.jpg")), 1, "nope.jpg")
    one_line_error(daemon.cli("ask", "hi", "--attach", str(tmp_path)), 1, "not a regular file")
    gif = tmp_path / "anim.gif"
    gif.write_bytes(b"GIF89a" + b"\x00" * 64)
    one_line_error(daemon.cli("ask", "hi", "--attach", str(gif)), 1, "not a supported image")
    piped = subprocess.run(
        f"{' '.join(locod_command('--config', str(daemon.config_path), 'config', 'show'))} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=daemon.env,
    )
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_config_show_prints_toml_that_loads_back(daemon: DaemonHandle) -> None:
    shown = daemon.cli("config", "show")
    assert shown.returncode == 0
    parsed = tomllib.loads(shown.stdout)
    assert parsed["local"]["models"][0]["name"] == "smollm2-135m-instruct"
    assert "null" not in shown.stdout


def test_ask_reads_stdin_and_the_cli_has_a_version(daemon: DaemonHandle) -> None:
    assert daemon.cli("--version").stdout.startswith("locod ")
    piped = daemon.cli("ask", "-", "--max-tokens", "2", "--force", "local", stdin="Say hi.")
    assert piped.returncode == 0 and piped.stdout.strip()
    implicit = daemon.cli("ask", "--max-tokens", "2", "--force", "local", stdin="Say hello.")
    assert implicit.returncode == 0
    assert [r["prompt_chars"] for r in daemon.rows()] == [len("Say hi."), len("Say hello.")]


def test_status_decisions_and_reload_read_well(daemon: DaemonHandle) -> None:
    daemon.cli("ask", "hi", "--max-tokens", "2")
    status = daemon.cli("status").stdout
    cpu = r"CPU \S+ (at \S+|\(temperature n/a\))"  # with its temperature, or said unknown (no sensor)
    assert "None" not in status and re.search(cpu, status), status  # every figure labelled
    decisions = daemon.cli("decisions").stdout.splitlines()
    assert decisions[0].split()[:2] == ["id", "time"]
    reason = daemon.rows()[-1]["reason"]
    assert decisions[-1].endswith(reason)  # whole, not cut mid-sentence
    assert "no config file was found" not in daemon.cli("reload").stdout  # the test's daemon has a file


def test_a_broken_config_file_does_not_cut_the_user_off(daemon: DaemonHandle) -> None:
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\n[routing]\nsla = 'high'\n")
    result = daemon.cli("status")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "locod" in result.stdout


def test_a_config_file_that_does_not_load_is_named_not_called_a_stopped_daemon(
    daemon: DaemonHandle, tmp_path: Path
) -> None:
    """The config names the socket's place and then breaks: the client finds the daemon by that one line
    (reload then says why it rejects the file); where no daemon answers, the error is the config's."""
    runtime = daemon.env["LOCOD_RUNTIME_DIR"]
    broken = daemon.config_path.read_text() + f'\n[paths]\nruntime_dir = "{runtime}"\n\nthis is = = not toml [[\n'
    daemon.config_path.write_text(broken)
    env = {k: v for k, v in daemon.env.items() if k != "LOCOD_RUNTIME_DIR"}  # only the file says where

    def cli(*args: str, config: Path = daemon.config_path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            locod_command("--config", str(config), *args), capture_output=True, text=True, env=env, timeout=60
        )

    reload = cli("reload")
    assert reload.returncode == 2 and "reload rejected" in reload.stderr and "not valid TOML" in reload.stderr
    assert "line" in reload.stderr and "not running" not in reload.stdout + reload.stderr
    status = cli("status")
    assert status.returncode == 0 and "not valid TOML" in status.stderr and "using the daemon at" in status.stderr
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(f'[paths]\nruntime_dir = "{tmp_path / "nobody"}"\n[routing]\nsla = 1.5\n')
    for command in ("status", "reload", "stop"):
        result = cli(command, config=elsewhere)
        assert result.returncode == 2, result.stderr
        assert str(elsewhere) in result.stderr and "routing.sla" in result.stderr
        assert "not running" not in result.stderr
        assert command == "stop" or "no daemon answers" in result.stderr
    stop = cli("stop")  # stop signals only the daemon a config that loads names: it says why it does not
    assert stop.returncode == 2 and "not valid TOML" in stop.stderr and daemon.proc.poll() is None
    stop = cli("--endpoint", daemon.endpoint, "stop")
    assert stop.returncode == 0, stop.stderr
    assert daemon.proc.wait(60) == 0


@pytest.mark.skipif(Path("/run/locod").exists() or not os.access("/run", os.W_OK), reason="needs a free /run/locod")
def test_without_a_socket_of_their_own_clients_use_the_system_daemons(daemon_factory: Any, tmp_path: Path) -> None:
    """The system unit's socket is /run/locod/locod.sock; a user's `locod status` finds it."""
    handle = daemon_factory(extra_env={"LOCOD_RUNTIME_DIR": "/run/locod"})
    try:
        env = {**handle.env, "LOCOD_RUNTIME_DIR": str(tmp_path / "mine")}  # no daemon of this user's
        status = subprocess.run(locod_command("status", "--json"), capture_output=True, text=True, env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["endpoints"][0] == "ipc:///run/locod/locod.sock"
    finally:
        handle.stop()
        shutil.rmtree("/run/locod", ignore_errors=True)


def test_upgrades_restart_the_service_and_put_locod_on_path() -> None:
    """`systemctl reload-or-restart` only sends SIGHUP to this unit (it has ExecReload): the old code would
    keep running after an upgrade."""
    script = (REPO / "scripts" / "install.sh").read_text()
    assert (
        "reload-or-restart" not in script
        and script.count("systemctl restart") + script.count("systemctl --user restart") == 2
    )
    assert 'ln -sfn "$venv/bin/locod" "$bin_dir/locod"' in script
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "install.sh")]).returncode == 0


def test_ctrl_c_in_chat_stops_the_answer_and_returns_to_the_prompt(daemon_factory: Any) -> None:
    handle = daemon_factory({"local": {"max_tokens": 1500}, "routing": {"mode": "local"}})
    chat = subprocess.Popen(
        locod_command("--config", str(handle.config_path), "chat", "--session", "c"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=handle.env,
    )
    assert chat.stdin is not None and chat.stdout is not None
    chat.stdin.write("Tell a very long story about mountains.\n")
    chat.stdin.flush()
    assert chat.stdout.read(20)  # the answer is being written
    chat.send_signal(signal.SIGINT)
    chat.stdin.write("Say hi.\n\n")  # one more turn, then an empty line leaves
    chat.stdin.flush()
    _, stderr = chat.communicate(timeout=300)
    assert chat.returncode == 0 and "[stopped]" in stderr, stderr
    outcomes = [r["outcome"] for r in handle.rows()]
    assert outcomes[0] == "cancelled" and outcomes[-1] == "ok" and len(outcomes) == 2
