"""Leftovers earlier sessions noticed: a keyless endpoint that can be declared, a temperature left to the
endpoint when the client gives none, unknown-model hints after `locod models rm`, CLI flags' own words, and a
client that bounds what a daemon end may send it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Client
from locod.daemon.catalog import PulledModel, register
from locod.daemon.config import load_config
from locod.daemon.pull import parse_size
from locod.errors import ConfigError, DaemonNotRunning
from locod.limits import MAX_REPLY_BYTES

from .conftest import SECRET, cloud_config, free_port, locod_command, start_daemon, write_config
from .faultproxy import Fault, FaultProxy


def run_locod(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `locod` with no config file and no daemon, as a new user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), LOCOD_RUNTIME_DIR=str(home / "run"))
    env.update(XDG_STATE_HOME=str(home / "state"), XDG_DATA_HOME=str(home / "data"))
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120, cwd=home)


def _keyless(base_url: str, mode: str = "cloud") -> dict[str, Any]:
    """The loopback cloud model declared as taking no key."""
    config = cloud_config(base_url, mode=mode, timeout_s=30.0)
    config["cloud"]["models"][0]["needs_key"] = False
    return config


def test_a_keyless_endpoint_is_declared_and_never_warned_about(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Leftover: a loopback endpoint that needs no key had "cloud model ... has no API key" in the log and in
    every `locod status`, `reload` and `stop`, with no way to say it needs none. ``needs_key = false`` says so;
    the default key variable, set for another endpoint, is not sent to it."""
    handle = daemon_factory(_keyless(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    status = handle.cli("status", "--json")
    assert json.loads(status.stdout)["cloud"]["no_api_key"] == {}, status.stdout
    assert "has no API key" not in handle.cli("status").stdout
    reloaded = handle.cli("reload")
    assert reloaded.returncode == 0 and "has no API key" not in reloaded.stderr, reloaded.stderr
    asked = handle.cli("ask", "Say hi.", "--max-tokens", "4", "-v")
    assert asked.returncode == 0 and "cloud-small" in asked.stderr, asked.stderr
    sent = proxy.chat_requests()
    assert sent and all(SECRET not in seen.headers.get("authorization", "") for seen in sent)
    assert "has no API key" not in handle.log() and SECRET not in handle.log()

    proxy.set(Fault("status", status=401, times=1))
    refused = handle.cli("ask", "Hi", "--max-tokens", "2")
    assert refused.returncode == 0  # answered locally instead
    assert "the endpoint asks for a key, but 'cloud-small' has needs_key = false" in refused.stderr, refused.stderr
    assert SECRET not in json.dumps(handle.rows())


@pytest.mark.parametrize("place", [{"api_key_file": "/etc/locod/key"}, {"api_key_env": "OPENAI_API_KEY"}])
def test_a_keyless_model_that_names_a_key_is_refused(tmp_path: Path, place: dict[str, str]) -> None:
    """Both said, one is a slip: a key that would never be sent, or an endpoint refusing every turn unwarned."""
    config = _keyless("http://127.0.0.1:9/v1")
    config["cloud"]["models"][0].update(place)
    path = write_config(tmp_path / "config.toml", config)
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={"LOCOD_RUNTIME_DIR": str(tmp_path / "run")})
    assert f"needs_key = false says the endpoint takes no key, but {next(iter(place))}" in refused.value.message


def test_no_temperature_given_leaves_the_endpoint_its_own(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Leftover: a turn without a temperature was sent 0.7 to the cloud, where an OpenAI client that leaves the
    field out gets the endpoint's own default. Now it is sent none, through the socket and the HTTP API, and
    one given is sent as given; a local turn without one still answers (at the device's 0.7). Likewise the
    seed: one not given was sent as null, which an endpoint checking its fields strictly may refuse."""
    port = free_port()
    handle = daemon_factory(_keyless(proxy.base_url, mode="auto"), extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"})
    plain = handle.cli("ask", "Say hi.", "--max-tokens", "4", "--force", "cloud")
    given = handle.cli("ask", "Say hi.", "--max-tokens", "4", "--force", "cloud", "--temperature", "0.3", "--seed", "7")
    assert plain.returncode == 0 and given.returncode == 0, plain.stderr + given.stderr
    body = json.dumps({"model": "cloud-small", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
    bodies = [seen.body for seen in proxy.chat_requests()]
    assert len(bodies) == 3 and "temperature" not in bodies[0] and "temperature" not in bodies[2], bodies
    assert bodies[1]["temperature"] == 0.3
    assert "seed" not in bodies[0] and "seed" not in bodies[2] and bodies[1]["seed"] == 7, bodies
    local = handle.cli("ask", "Say hi.", "--max-tokens", "4", "--force", "local")
    assert local.returncode == 0 and local.stdout.strip(), local.stderr


def test_a_removed_model_leaves_the_unknown_model_hint(tmp_path: Path, models_dir: Path) -> None:
    """Leftover: after `locod models rm tiny`, every unknown model name the running daemon refused went on to
    say "left out until their file can be loaded: 'tiny'" until a reload, as if a file could bring it back.
    A model whose file is missing but which is still configured is still named."""
    mine = tmp_path / "models"
    mine.mkdir()
    embedded = models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    (mine / embedded.name).symlink_to(embedded)
    (mine / "tiny.gguf").symlink_to(embedded)
    register(mine, PulledModel("tiny", "tiny.gguf", embedded.stat().st_size, "0" * 64, "test", "Q4_1", 2048, 2048))
    handle = start_daemon(tmp_path / "d", mine)
    try:
        (mine / "tiny.gguf").unlink()
        missing = handle.cli("ask", "Hi", "--model", "tinyy")
        assert "left out until their file can be loaded: 'tiny' (its file is missing" in missing.stderr
        removed = handle.cli("models", "rm", "tiny")
        assert removed.returncode == 0, removed.stderr
        after = handle.cli("ask", "Hi", "--model", "tinyy")
        assert after.returncode == 1 and "no model named 'tinyy'" in after.stderr, after.stderr
        assert "'tiny'" not in after.stderr
    finally:
        handle.stop()
    shutil.rmtree(mine)


@pytest.mark.parametrize("endpoint", ["x", "tcp://host", "ipc://", "tcp://127.0.0.1:99999"])
def test_an_endpoint_that_is_none_says_what_one_looks_like(tmp_path: Path, endpoint: str) -> None:
    """Leftover: `--endpoint x` said ZeroMQ's "Invalid argument (addr=b'x')", and `tcp://host` without a
    port ended in int()'s traceback."""
    result = run_locod(tmp_path, "--endpoint", endpoint, "status")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    shape = "must look like ipc://PATH or tcp://HOST:PORT (such as tcp://127.0.0.1:5557"
    assert f"endpoint {endpoint!r} {shape}" in result.stderr, result.stderr


@pytest.mark.parametrize("kind", ["fifo", "file", "under a file"])
def test_models_fetch_into_no_directory_says_so(tmp_path: Path, kind: str) -> None:
    """Leftover: `locod models fetch --dir FIFO` (or a file) said "File exists"."""
    place = tmp_path / "place"
    if kind == "fifo":
        os.mkfifo(place)
    else:
        place.write_text("")
    given = place / "models" if kind == "under a file" else place
    result = run_locod(tmp_path, "models", "fetch", "--dir", str(given))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{given} is not a directory, and none can be made there" in result.stderr, result.stderr


def test_max_size_is_bounded(tmp_path: Path) -> None:
    """Leftover: `--max-size` took any size short of infinity; 2T is over the largest model file there is."""
    assert parse_size("2T") == 2 << 40
    refused = run_locod(tmp_path, "models", "pull", "--max-size", "3T", "http://127.0.0.1:9/x.gguf")
    assert refused.returncode == 2, refused.stderr
    assert "argument --max-size: must be more than 0 and at most 2T" in refused.stderr, refused.stderr


class OversizedEnd:
    """A ZeroMQ ROUTER at an ipc path that answers every request with one frame over MAX_REPLY_BYTES, as a
    program that is not locod, or a hostile one, could."""

    def __init__(self, path: Path) -> None:
        self.address = f"ipc://{path}"
        self.received = 0
        self._done = threading.Event()
        self._router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.address)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        huge = bytes(MAX_REPLY_BYTES + 1)
        while not self._done.is_set():
            if self._router.poll(100):
                peer, _ = self._router.recv_multipart()
                self.received += 1
                self._router.send_multipart([peer, huge], copy=False)

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._router.close(linger=0)


def test_a_frame_over_what_a_reply_may_take_is_not_read_and_said(tmp_path: Path) -> None:
    """Leftover: the client set no MAXMSGSIZE, so whatever answered at the endpoint could send a frame as large
    as its memory. Now ZeroMQ closes the connection on one over MAX_REPLY_BYTES, unread and for good: a turn,
    and a read-only request that would be sent again, say the answer was lost at the first close (a send on
    the dead connection waited forever), and the Client connects afresh for the next request."""
    (tmp_path / "run").mkdir()
    end = OversizedEnd(tmp_path / "run" / "locod.sock")
    try:
        with Client(end.address, timeout_s=60, turn_timeout_s=600) as client:
            with pytest.raises(DaemonNotRunning) as lost:
                list(client.chat("Hi"))
            assert lost.value.code == "connection_lost", lost.value.message
            assert f"a frame over the {MAX_REPLY_BYTES} bytes this client reads" in lost.value.message
            for _ in range(2):  # on the fresh connection too
                with pytest.raises(DaemonNotRunning) as lost:
                    client.ping()
                assert lost.value.code == "connection_lost", lost.value.message
    finally:
        end.close()
    assert end.received >= 3  # the turn, and each ping once
