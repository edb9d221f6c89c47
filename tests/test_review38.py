"""Review 38: faults found reading this session's changes, each against the real daemon (the embedded
model, real ZeroMQ and SQLite, the loopback llama_cpp.server as the cloud behind the fault proxy)."""

from __future__ import annotations

import json
import os
import resource
import urllib.error
import urllib.request
from typing import Any

import pytest

from locod.errors import DaemonNotRunning

from .conftest import DaemonHandle
from .faultproxy import Fault, FaultProxy
from .test_bad_input import exchange, raw_socket
from .test_http import http_daemon

BIG_KEY = "k" * 300_000 + "\ud800"  # a key that no pair completes, 300 kB long


def test_a_cloud_answer_its_endpoint_cut_short_is_not_blamed_on_a_local_context(
    cloud_daemon: DaemonHandle, proxy: FaultProxy
) -> None:
    """`locod ask`'s notice for an answer cut short said, for a cloud answer whose endpoint said ``length``
    before the tokens asked (a provider's own output cap), "the model's context was full: a new session,
    or a larger n_ctx": a local model's setting, which changes nothing for a cloud answer."""
    proxy.set(Fault(kind="finish", finish="length"))
    # greedy, so that the answer ends well short of the limit on every run: sampled, it once ran to all 64
    asked = cloud_daemon.cli("ask", "--max-tokens", "256", "--temperature", "0", "Say hi.")
    assert asked.returncode == 0, asked.stderr
    assert cloud_daemon.rows()[-1]["location"] == "cloud" and cloud_daemon.rows()[-1]["tokens_out"] < 256
    assert "n_ctx" not in asked.stderr and "context" not in asked.stderr, asked.stderr
    assert "[the cloud endpoint stopped the answer at its own length limit, before the 256 tokens asked]" in (
        asked.stderr
    )


def test_a_lone_surrogate_in_a_long_key_is_named_without_echoing_the_key(daemon_factory: Any) -> None:
    """A lone surrogate is refused naming the field that holds it; a 300 kB key holding one came back whole
    in the refusal, at both doors, as the unknown keys did before they were quoted bounded (a3d0c4f)."""
    handle, base = http_daemon(daemon_factory)
    sock = raw_socket(handle)
    try:
        raw = json.dumps({"v": 1, "id": "t", "op": "ping", BIG_KEY: 1}).encode()
        reply = exchange(sock, raw)
    finally:
        sock.close()
    assert reply["type"] == "error" and reply["code"] == "bad_request", str(reply)[:300]
    assert len(reply["message"]) < 1000 and "300,001 characters" in reply["message"], reply["message"][:300]
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], BIG_KEY: 1}).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("a lone surrogate was let in")
    except urllib.error.HTTPError as exc:
        status, error = exc.code, json.loads(exc.read())["error"]
    assert status == 400 and error["code"] == "bad_request"
    assert len(json.dumps(error)) < 2000 and error["param"] == "k" * 80 + "...(300,001 characters)", str(error)[:300]
    assert handle.proc.poll() is None


def test_one_process_leaking_clients_leaves_room_at_the_ipc_socket_for_the_owners_commands(
    daemon_factory: Any,
) -> None:
    """The ipc socket's bound (an eighth of the open-file limit) held per process as much as in all: a script
    leaking clients, each of which had asked (so none could be evicted), took every place, and `locod status`
    and `locod stop` from the owner's shell were refused until the script ended. One process now holds half
    of it at most."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=300)
    with pytest.raises(DaemonNotRunning):
        for _ in range(300):
            handle.client(timeout_s=3).ping()  # kept open, as the script keeps it
    leaker = f"pid {os.getpid()}"
    assert f"ipc: refused a connection from {leaker}: 18 connections open from it, at half" in handle.log()
    status = handle.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["ipc"]["max"] == 300 // 8
    assert handle.cli("stop").returncode == 0
    assert handle.proc.wait(60) == 0
