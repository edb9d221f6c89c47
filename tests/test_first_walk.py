"""What a tester found walking the README on a fresh clone, each through the real CLI in a subprocess (and a
real daemon where one is needed): the command lines the docs show work as written, and what goes wrong
says what happened and what to do."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

from .conftest import REPO, SECRET, cloud_config, free_port, locod_command, wait_for
from .faultproxy import Fault, FaultProxy


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No config file of the user's, no LOCOD_* of the caller's: a fresh install's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), LOCOD_STATE_DIR=str(tmp_path / "state"))
    env.update(LOCOD_RUNTIME_DIR=str(tmp_path / "run"), LOCOD_MODELS_DIR=str(tmp_path / "models"), **extra)
    return env


def locod(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120)


def test_global_options_work_after_the_command_too(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    shown = locod(env, "--set", "routing.sla=0.3", "config", "show", "--set", "routing.mode=local", "--json")
    assert shown.returncode == 0, shown.stderr
    routing = json.loads(shown.stdout)["routing"]
    assert (routing["sla"], routing["mode"]) == (0.3, "local")  # before and after the command: both kept
    for command in (["serve"], ["models", "pull"], ["config", "show"]):
        helped = locod(env, *command, "--help").stdout
        assert "--set SECTION.KEY=VALUE" in helped and "--config" in helped, command


def test_a_reader_that_leaves_ends_the_output_quietly(tmp_path: Path) -> None:
    piped = subprocess.run(
        # `true` leaves before locod has written anything (head -1 could leave after a write that still fit
        # the pipe, and then nothing breaks): the write meets a closed pipe every time
        f"{' '.join(locod_command('config', 'show'))} | true; echo rc=${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
    )
    assert piped.stderr == "" and "rc=141" in piped.stdout  # as SIGPIPE would end it: no "Broken pipe" line


def test_policy_train_help_needs_no_torch(tmp_path: Path) -> None:
    """`import torch` made to fail the standard way (a None entry in sys.modules), as on an install without
    the train extra: the help is shown; only training itself says the extra is needed."""
    blocked = "import sys; sys.modules['torch'] = None; from locod.cli import main; sys.exit(main(sys.argv[1:]))"
    env = clean_env(tmp_path)

    def train(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", blocked, "policy", "train", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    helped = train("--help")
    assert helped.returncode == 0 and "--steps" in helped.stdout and "--from-db" in helped.stdout, helped.stderr
    trained = train("--steps", "8")
    assert trained.returncode == 1 and "needs the train extra" in trained.stderr, trained.stderr
    assert "pip install '.[train]'" in trained.stderr


def test_what_the_running_daemon_has_is_what_the_user_is_shown(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A daemon with the HTTP door on and a cloud model without a key; then the config file gains a local
    model and a new SLA that the daemon has not read yet."""
    port = free_port()
    handle = daemon_factory(cloud_config(proxy.base_url, mode="auto"), extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"})
    assert "cloud model 'cloud-small' has no API key: set $LOCOD_CLOUD_API_KEY" in handle.log()
    status = handle.cli("status")
    assert f"OpenAI-compatible API at http://127.0.0.1:{port}/v1" in status.stdout
    assert "cloud model cloud-small has no API key: set $LOCOD_CLOUD_API_KEY" in status.stdout

    with handle.config_path.open("a") as config:
        config.write('[[local.models]]\nname = "mine"\npath = "SmolLM2-135M-Instruct.Q4_1.gguf"\n')
    handle.config_path.write_text(handle.config_path.read_text().replace('mode = "auto"', 'mode = "auto"\nsla = 0.5'))
    running = handle.cli("config", "show")
    assert "the running daemon's configuration (pid" in running.stdout and "sla = 0.8" in running.stdout
    assert f'listen = "127.0.0.1:{port}"' in running.stdout
    new = handle.cli("config", "show", "--new")
    assert "what `locod serve` would start with now" in new.stdout and "sla = 0.5" in new.stdout
    other = handle.config_path.with_name("other.toml")
    other.write_text("[routing]\nsla = 0.3\n")
    checked = subprocess.run(
        locod_command("--config", str(other), "config", "show"), capture_output=True, text=True, env=handle.env
    )
    assert "the running daemon reads" in checked.stdout and "not this file" in checked.stdout, checked.stdout
    assert "sla = 0.3" in checked.stdout  # the file named, checked before a restart
    other.write_text("[routing]\nsla = 3\n")
    broken = subprocess.run(
        locod_command("--config", str(other), "config", "show"), capture_output=True, text=True, env=handle.env
    )
    assert broken.returncode != 0 and "routing.sla" in broken.stderr  # said, not hidden behind the daemon's
    listed = handle.cli("models", "list").stdout
    assert "not known to the running daemon until `locod reload`: mine" in listed

    unknown = handle.cli("ask", "Hi", "--model", "ghost")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "no model named 'ghost'; local models: ['smollm2-135m-instruct'], cloud models: ['cloud-small']" in (
        unknown.stderr
    )
    assert "reload" not in unknown.stderr
    added = handle.cli("ask", "Hi", "--model", "mine")
    assert "'mine' was added after the daemon last read its configuration: run `locod reload`" in added.stderr
    assert handle.cli("reload").returncode == 0
    assert handle.log().count("has no API key") == 1  # said at start, not again at each reload
    assert handle.cli("ask", "Hi", "--model", "mine", "--max-tokens", "2").returncode == 0


def test_a_refused_key_says_where_the_key_comes_from(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(cloud_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    assert "no API key" not in handle.log()
    proxy.set(Fault("status", status=401, times=1))
    refused = handle.cli("ask", "Hi", "--max-tokens", "2")
    assert refused.returncode == 0  # answered locally instead
    assert (
        "HTTP 401 from the endpoint: check the API key, which the daemon takes from $LOCOD_CLOUD_API_KEY"
        in refused.stderr
    )
    assert SECRET not in handle.log() and SECRET not in json.dumps(handle.rows())


def test_config_show_names_where_the_values_came_from(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path / "none"), "LOCOD_RUNTIME_DIR": str(tmp_path)}
    shown = subprocess.run(locod_command("config", "show"), capture_output=True, text=True, env=env).stdout
    header = shown.splitlines()[0]
    assert "no daemon is running" in header and "built-in defaults (no config file found)" in header, header
    assert "(defaults)" not in header


def test_locod_stop_lets_the_turn_in_flight_finish(daemon_factory: Any) -> None:
    handle = daemon_factory({"local": {"max_tokens": 300}, "routing": {"mode": "local"}})
    ask = subprocess.Popen(
        locod_command("--config", str(handle.config_path), "ask", "Tell a story about mountains.", "--seed", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=handle.env,
    )
    assert ask.stdout is not None and ask.stdout.read(1)  # the answer is being written
    stopped = handle.cli("stop", timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr, stopped.stderr
    assert handle.proc.wait(30) == 0
    assert "stopped after" in handle.log()  # a log that ends so was not a crash
    _, err = ask.communicate(timeout=60)
    assert ask.returncode == 0, err  # SIGTERM's semantics: the turn in flight finished
    assert [r["outcome"] for r in handle.rows()] == ["ok"]
    assert handle.cli("status").returncode == 5
    logged = handle.cli("decisions", "--json")  # the log is a file: readable with the daemon stopped
    assert logged.returncode == 0 and "locod is not running: read from" in logged.stderr, logged.stderr
    assert [r["outcome"] for r in json.loads(logged.stdout)] == ["ok"]


def test_a_daemon_killed_mid_answer_is_said_as_an_answer_cut_off(daemon_factory: Any) -> None:
    handle = daemon_factory({"local": {"max_tokens": 1500}, "routing": {"mode": "local"}})
    ask = subprocess.Popen(
        locod_command("--config", str(handle.config_path), "ask", "Tell a very long story about mountains."),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=handle.env,
    )
    assert ask.stdout is not None and ask.stdout.read(20)  # the answer is being written
    handle.stop(signal.SIGKILL)
    out, err = ask.communicate(timeout=60)
    assert ask.returncode == 5 and out.endswith("\n"), (out, err)
    assert err.startswith("locod: the answer was cut off: the daemon stopped during the turn"), err
    assert len(err.strip().splitlines()) == 1


def test_the_wheel_builds_without_warnings_and_holds_the_runtime_data(tmp_path: Path) -> None:
    """`pip install .` printed ~80 lines of "Package 'locod.policy.data' is absent from the packages
    configuration"; the wheel must still carry the data the code reads at run time."""
    pip = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*pip, str(REPO), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert "absent from the" not in built.stdout + built.stderr
    (wheel,) = tmp_path.glob("locod-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("policy/data/bigbench_trace.jsonl", "policy/default/policy.onnx", "models/manifest.toml"):
        assert f"locod/{data}" in names
    assert any(n.startswith("locod/policy/priors/") and n.endswith(".npz") for n in names)
    assert not any(n.endswith(".gguf") for n in names)


def test_an_sla_the_local_model_alone_cannot_reach_is_said_with_what_to_do(daemon_factory: Any) -> None:
    """No cloud model and the default SLA: the attained share sits far below the target, and status says
    why and what to change from the twentieth turn on, not only once Q has grown to its cap."""
    handle = daemon_factory({"routing": {"sla": 0.8, "explore_c": 0.0}})
    client = handle.client()
    reasons = [client.ask(f"Say the number {i}.", max_tokens=2).decision.reason for i in range(20)]
    assert all("the only place on offer" in r and "no cloud model is configured" in r for r in reasons)
    shown = handle.cli("status", "--set", "routing.sla=0.5")
    status = shown.stdout
    assert "SLA out of reach" in status and "configure a cloud model or lower routing.sla" in status, status
    assert "--set routing.sla does not change the running daemon" in shown.stderr  # not silently ignored
    assert client.status()["routing"]["q"] < 25  # far from its cap (50)


def test_a_long_answer_streams_past_the_clients_silence_limit(daemon_factory: Any) -> None:
    """The client's turn limit bounds silence, not the turn: an answer that streams for longer than it on a
    slow device is read to its end, not reported as a daemon that stopped."""
    handle = daemon_factory({"local": {"max_tokens": 400}, "routing": {"mode": "local"}})
    handle.client().ask("Hi", max_tokens=2)  # the model is loaded: no silence before the first frame
    # 2.5 s: with 1 s, a loaded machine (a CI run beside other work) was silent that long between two frames
    with handle.client(turn_timeout_s=2.5) as client:
        result = client.ask("Tell a long story about a lighthouse keeper.", temperature=0.0, seed=1)
    assert result.done.outcome == "ok"
    assert result.done.latency_ms > 2500, "the answer must outlast the limit for this test to mean anything"


def test_locod_stop_signals_nothing_but_a_locod_that_answers(tmp_path: Path) -> None:
    """A socket another program listens on (named directly, or through a symlink where locod's socket would
    be) is not a daemon to stop: nothing that does not answer locod's ping is signalled."""
    path = tmp_path / "other.sock"
    listen = f"import socket, time; s = socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); s.listen()"
    decoy = subprocess.Popen([sys.executable, "-c", listen + "; time.sleep(120)"])
    try:
        wait_for(path.exists, 30, "the decoy's socket")
        env = clean_env(tmp_path)
        named = locod(env, "stop", "--endpoint", f"ipc://{path}")
        assert named.returncode != 0 and decoy.poll() is None, named.stderr
        (tmp_path / "run").mkdir(mode=0o700)
        (tmp_path / "run" / "locod.sock").symlink_to(path)
        linked = locod(env, "stop")
        assert linked.returncode != 0 and decoy.poll() is None, linked.stderr
    finally:
        decoy.kill()
        decoy.wait()


def test_a_turn_that_waited_for_the_local_model_says_how_long_in_its_record(daemon_factory: Any) -> None:
    """A second client behind a long answer waited seconds that its record's latencies (counted from its
    acceptance) do not show: the wait is recorded beside them."""
    handle = daemon_factory({"local": {"max_tokens": 200}, "routing": {"mode": "local"}})
    handle.client().ask("Hi", max_tokens=2)  # the model is loaded
    started = threading.Event()
    first: list[Any] = []

    def long_answer() -> None:
        with handle.client() as client:
            for frame in client.chat("Tell a long story about a lighthouse keeper.", temperature=0.0, seed=1):
                started.set()
                first.append(frame)

    talker = threading.Thread(target=long_answer)
    talker.start()
    assert started.wait(60)
    behind = handle.client().ask("Say hi.", max_tokens=2)
    talker.join(120)
    rows = {r["id"]: r for r in handle.rows()}
    long_row, short_row = rows[first[-1].decision], rows[behind.done.decision]
    assert short_row["latency_queue_ms"] >= long_row["latency_total_ms"] / 2  # it waited out most of the answer
    assert long_row["latency_queue_ms"] < short_row["latency_queue_ms"]


def test_chat_says_the_daemon_is_stopped_before_its_banner(tmp_path: Path) -> None:
    """Walk finding: `locod chat` greeted the user and only said the daemon was not running after a question."""
    chat = subprocess.run(
        locod_command("chat"), input="hi\n", capture_output=True, text=True, env=clean_env(tmp_path), timeout=60
    )
    assert chat.returncode == 5 and "locod is not running" in chat.stderr
    assert "locod chat, session" not in chat.stderr


def test_decisions_print_costs_as_dollars(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Walk finding: a cloud turn's cost showed as 4.125e-05 in `locod decisions`, $0.00004 in `ask -v`."""
    handle = daemon_factory(cloud_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    assert handle.cli("ask", "Hi", "--max-tokens", "4").returncode == 0
    (row,) = handle.rows()
    assert 0 < row["cost_usd"] < 1e-3
    listed = handle.cli("decisions").stdout
    assert f" {row['cost_usd']:.5f} " in listed and "e-0" not in listed, listed


def test_with_no_daemon_the_system_services_log_is_read_when_the_user_has_none(
    daemon_factory: Any, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """`sudo -u locod locod decisions` with the system service stopped: the user's own state directory holds
    no log, the service's does, so that one is read (as `locate` picks the system socket)."""
    from locod import cli
    from locod.commands import common

    service = daemon_factory({"routing": {"mode": "local"}})
    service.client().ask("Hello", max_tokens=4)
    service.stop()
    monkeypatch.setattr(common, "SYSTEM_STATE_DIR", service.home / "state")
    for name in [k for k in os.environ if k.startswith("LOCOD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LOCOD_STATE_DIR", str(tmp_path / "own-state"))  # this user's: no log in it
    monkeypatch.setenv("LOCOD_RUNTIME_DIR", str(tmp_path / "own-run"))
    assert cli.main(["decisions", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["outcome"] for r in json.loads(out)] == ["ok"]
    assert f"read from {service.home / 'state' / 'locod.db'}" in err

    # Another user (root, say, with plain sudo) is told how to read it: a reader's -wal and -shm files of
    # its own would leave the service unable to open its log.
    if os.geteuid() == 0:  # only root can give the directory away
        os.chown(service.home / "state", 65534, 65534)
        assert cli.main(["decisions", "--json"]) == 4
        assert f"is read as its user: `sudo -u {pwd.getpwuid(65534).pw_name} locod ...`" in capsys.readouterr().err
