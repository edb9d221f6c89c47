"""Attacks of round 37 on a running daemon: its owner's own processes opening ipc connections up to the
daemon's open-file limit."""

from __future__ import annotations

import os
import resource
from typing import Any

import pytest

from locod.errors import DaemonNotRunning

from .conftest import wait_for


def test_a_script_leaking_clients_is_refused_at_the_ipc_bound_and_the_daemon_serves_on(daemon_factory: Any) -> None:
    """A careless script of the daemon's own user makes a client for each request and never closes it: each
    holds an ipc connection, and so a descriptor of the daemon's, until there is none left. libzmq's ipc
    listener then aborted the daemon ("Too many open files (src/ipc_listener.cpp)", SIGABRT) at the 270th,
    and every client's turn with it. Now the ipc socket holds at most an eighth of the open-file limit: the
    newcomer past it is shut at once, the log names the process that holds the connections, `status`
    counts it, and the clients that asked before stay served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=300)
    established = handle.client()
    assert established.ping()["pong"]
    with pytest.raises(DaemonNotRunning, match="at its bound on connections"):
        for _ in range(300):
            handle.client(timeout_s=3).ping()  # kept open, as the script keeps it
    assert handle.proc.poll() is None, handle.log()[-2000:]
    ipc = established.status()["ipc"]
    assert ipc["max"] == 300 // 8 and ipc["open"] == ipc["max"] // 2 and ipc["refused"] > 0  # one process: half
    assert established.ask("Say hi.", max_tokens=2).done.outcome == "ok"
    leaker = f"pid {os.getpid()}"
    assert f"ipc: refused a connection from {leaker}: 18 connections open from it, at half" in handle.log()
    for client in handle.clients[1:]:
        client.close()
    wait_for(lambda: handle.client().ping()["pong"], 60, "a newcomer to be let in once the script's clients left")
    assert handle.proc.poll() is None and "Traceback" not in handle.log()
