"""Attack 41: the last session's additions attacked against the real daemon (the embedded model, real ZeroMQ
and SQLite, the loopback llama_cpp.server as the cloud behind the fault proxy, a fake daemon end of real
ZeroMQ for the client)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Client
from locod.errors import LocodError

from .conftest import DaemonHandle, cloud_config, locod_command
from .faultproxy import Fault, FaultProxy
from .test_http import http_daemon

# A script of the owner's that keeps a client for each request: it asks with each (so none is evictable) and
# keeps them all, until the daemon refuses one, then waits to be killed.
LEAKER = """
import sys, time
from locod.client import Client
from locod.errors import LocodError
kept = []
try:
    for _ in range(300):
        kept.append(Client(sys.argv[1], timeout_s=3))
        kept[-1].ping()
except LocodError:
    pass
print(len(kept), flush=True)
time.sleep(600)
"""


def leak_clients(handle: DaemonHandle) -> subprocess.Popen[str]:
    """A process leaking clients at ``handle``'s ipc socket, once it holds all it was let in with."""
    leaker = subprocess.Popen(
        [sys.executable, "-c", LEAKER, handle.endpoint], env=handle.env, stdout=subprocess.PIPE, text=True
    )
    assert leaker.stdout is not None and leaker.stdout.readline()
    return leaker


def test_processes_leaking_clients_together_leave_room_at_the_ipc_socket_for_the_owners_commands(
    daemon_factory: Any,
) -> None:
    """One process holds half the ipc socket's bound at most (ca453e0), but three processes of a script (a
    worker pool, each a client a request) held all of it, each connection vouched for by its request and so
    never evicted: `locod status` and `locod stop` from the owner's shell were refused until they ended. A
    newcomer from a process holding two fewer than the greediest now takes that one's oldest connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=300)
    leakers = [leak_clients(handle) for _ in range(3)]
    try:
        status = handle.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["ipc"]["open"] <= 300 // 8
        assert handle.client(timeout_s=10).ask("Say hi.", max_tokens=2).done is not None
        # the evicted leakers' clients reconnect and are refused: a line a minute says so, not one each
        assert handle.log().count("ipc: refused a connection") <= 4, handle.log()[-3000:]
        assert "closed the oldest connection from pid" in handle.log()
    finally:
        for leaker in leakers:
            leaker.kill()
            leaker.wait()
    assert handle.cli("stop").returncode == 0
    assert handle.proc.wait(60) == 0


def test_silent_and_half_framed_ipc_connections_leave_the_owner_in(daemon_factory: Any) -> None:
    """Held: raw connections to the ipc socket that never send, or send half a ZMTP greeting, are evicted for
    the owner's commands (none of them asked), the daemon stays up and a turn is answered; the refusals are
    a line a minute, not one each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=300)
    squatters = []
    try:
        for n in range(200):
            squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            squatter.connect(handle.endpoint[len("ipc://") :])
            if n % 2:
                squatter.send(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01")  # the greeting's first bytes only
            squatters.append(squatter)
        for _ in range(3):
            status = handle.cli("status", "--json")
            assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["ipc"]["refused"] > 0
        assert handle.client(timeout_s=10).ask("Say hi.", max_tokens=2).done is not None
        assert handle.log().count("ipc: refused a connection") <= 4, handle.log()[-3000:]
    finally:
        for squatter in squatters:
            squatter.close()
    assert handle.cli("stop").returncode == 0
    assert handle.proc.wait(60) == 0


@pytest.fixture
def hostile_end(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A fake daemon at an ipc socket of the user's: it answers each request with the next error frame of the
    list it yields (its fields as given, the request's id added)."""
    path = tmp_path / "run" / "locod.sock"
    path.parent.mkdir()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{path}")
    frames: list[dict[str, Any]] = []
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            if router.poll(100):
                peer, raw = router.recv_multipart()
                frame = {"v": 1, "id": json.loads(raw)["id"], "type": "error", **frames.pop(0)}
                router.send_multipart([peer, json.dumps(frame).encode()])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"ipc://{path}", frames
    done.set()
    thread.join()
    router.close(linger=0)


ODD_FIELDS = [
    {"decision": "1`; rm -rf ~ #"},
    {"decision": True},
    {"decision": 1.5},
    {"kind": ["busy"]},
    {"code": {"x": 1}},
    {"message": None},
]


@pytest.mark.parametrize("odd", ODD_FIELDS, ids=[next(iter(odd)) + "=" + repr(odd)[:20] for odd in ODD_FIELDS])
def test_a_hostile_daemon_ends_error_frame_is_refused_as_unreadable(
    hostile_end: tuple[str, list[dict[str, Any]]], odd: dict[str, Any]
) -> None:
    """``errors.from_frame`` rebuilt whatever an error frame held: a ``decision`` that was text reached
    `locod ask`'s stderr as a command to run (`locod decisions 1`; rm -rf ~ #`), a ``kind`` that was a list
    ended the client in a TypeError's traceback. The client now refuses such a frame as an unreadable reply."""
    endpoint, frames = hostile_end
    frames.append({"kind": "busy", "code": "busy", "message": "at a limit", **odd})
    with Client(endpoint, timeout_s=10) as client, pytest.raises(LocodError) as raised:
        client.ping()
    assert raised.value.code == "bad_reply", raised.value.message
    assert next(iter(odd)) in raised.value.message and "rm -rf" not in raised.value.message


def test_a_hostile_daemon_ends_unknown_error_reaches_the_terminal_escaped(
    hostile_end: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Held: an unknown kind is a plain LocodError keeping the daemon's code, and a long message with a
    terminal's escape (one that retitles it) reaches stderr escaped, with exit status 1."""
    endpoint, frames = hostile_end
    frames.append({"kind": "martian", "code": "zap", "message": "\x1b]0;owned\x07" + "m" * 200_000})
    env = {**os.environ, "HOME": str(tmp_path)}
    status = locod_command("status", "--json", "--endpoint", endpoint)
    ran = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and "\x1b" not in ran.stderr and "\\x1b]0;owned" in ran.stderr, ran.stderr[:300]
    assert json.loads(ran.stdout)["code"] == "zap"


ODD_FINISHES: list[Any] = [42, ["stop"], {"why": "stop"}, "x" * 100_000, "stop\x1b[31m"]


def test_a_cloud_endpoints_unreadable_finish_reason_is_not_passed_on(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The done frame and the HTTP door passed a cloud endpoint's finish_reason on as it came: 42, a list or
    an object reached an OpenAI client, whose SDK reads one of a few words, and a 100 kB one came back whole
    in every reply. One that is not a short word is now no reason of the endpoint's own: the answer stays the
    cloud's, and the door says ``stop`` or ``length`` as for a local model."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=30.0))
    for finish in ODD_FINISHES:
        proxy.set(Fault(kind="finish", finish=finish))
        with urllib.request.urlopen(completions(base, max_tokens=8), timeout=120) as response:
            reply = json.loads(response.read())
        assert (reply["locod"]["location"], reply["locod"]["outcome"]) == ("cloud", "ok"), reply["locod"]
        assert reply["choices"][0]["finish_reason"] in ("stop", "length"), str(reply)[:300]
    proxy.set(Fault(kind="finish", finish=ODD_FINISHES[0]))
    answer = handle.client(timeout_s=60).ask("Say hi.", max_tokens=8)
    assert answer.done.location == "cloud" and answer.done.finish_reason is None


def test_a_cloud_endpoints_empty_or_unknown_finish_reason_held(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Held: an empty finish_reason is none (the stream never said it finished: answered locally), and an
    unknown word is the endpoint's own, passed on as it said it."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=30.0))
    proxy.set(Fault(kind="finish", finish=""))
    with urllib.request.urlopen(completions(base, max_tokens=8), timeout=120) as response:
        reply = json.loads(response.read())
    assert reply["locod"]["location"] == "local" and "without finishing" in reply["locod"]["fallback"]
    proxy.set(Fault(kind="finish", finish="eos_token"))
    with urllib.request.urlopen(completions(base, max_tokens=8), timeout=120) as response:
        reply = json.loads(response.read())
    assert reply["locod"]["location"] == "cloud" and reply["choices"][0]["finish_reason"] == "eos_token"
    assert handle.proc.poll() is None


def completions(base: str, **fields: Any) -> urllib.request.Request:
    """A POST of one user message to the HTTP door's chat completions."""
    body = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], **fields}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    return request
