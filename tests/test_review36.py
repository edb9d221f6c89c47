"""Review of docs/protocol.md, configuration.md, operations.md and reliability.md against the code: a request
field the op does not take, a rejected reload's reply, and the probe's backoff under a long interval. Each
test is one way in that disagreed with the docs, and now holds."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Client
from locod.daemon.telemetry import PROBE_BACKOFF_S, next_probe_wait

from .conftest import Context, DaemonHandle, start_daemon, write_config


def raw_reply(daemon: DaemonHandle, ctx: Context, message: dict[str, Any]) -> dict[str, Any]:
    """The last frame of the daemon's answer to one request sent as its JSON, as any ZeroMQ client sends it."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        sock.send(json.dumps({"v": 1, "id": "r36", **message}).encode())
        while True:
            assert sock.poll(60_000), f"no reply to {message}"
            frame: dict[str, Any] = json.loads(sock.recv())
            if frame["type"] in ("done", "error", "result"):
                return frame
    finally:
        sock.close()


def test_a_field_the_op_does_not_take_is_refused_by_name(daemon: DaemonHandle, ctx: Context) -> None:
    """A field no op reads was ignored: `max_tokens` beside `options` (OpenAI's place for it) let the answer
    run to 256 tokens, a misspelt `sesion` made a one-off turn, and a `decisions` query narrowed by a field
    the daemon does not know answered another session's records. Now each is refused, `bad_field`, naming
    the field, and nothing is recorded."""
    client = daemon.client()
    kept = client.ask("Say hi.", session="mine", max_tokens=2)
    assert kept.done.outcome == "ok"

    option = raw_reply(daemon, ctx, {"op": "chat", "prompt": "Count to fifty.", "max_tokens": 2})
    assert (option["type"], option["code"], option["id"]) == ("error", "bad_field", "r36")
    assert "'max_tokens'" in option["message"] and "'options'" in option["message"]

    misspelt = raw_reply(daemon, ctx, {"op": "chat", "prompt": "Hi.", "sesion": "mine"})
    assert misspelt["code"] == "bad_field" and "'sesion'" in misspelt["message"]

    narrowed = raw_reply(daemon, ctx, {"op": "decisions", "sesion": "other", "limit": 5})
    assert narrowed["code"] == "bad_field" and "'sesion'" in narrowed["message"]

    simple = raw_reply(daemon, ctx, {"op": "ping", "limit": 5})
    assert simple["code"] == "bad_field" and "'limit'" in simple["message"]

    assert [r["id"] for r in daemon.rows()] == [kept.decision.decision]  # the refused chats recorded nothing
    listed = raw_reply(daemon, ctx, {"op": "decisions", "session": "mine", "limit": 5})  # the op's own fields
    assert [r["id"] for r in listed["data"]] == [kept.decision.decision]
    assert raw_reply(daemon, ctx, {"op": "ping"})["data"]["pong"] is True


def test_a_rejected_reload_answers_every_field_of_an_accepted_one(daemon: DaemonHandle) -> None:
    """docs/protocol.md lists the reload reply's fields; a rejected reload's had no `models_changed`, so a
    client reading the field as documented failed on the one reply that most needs reading."""
    client = daemon.client()
    accepted = client.reload()
    write_config(daemon.config_path, {"routing": {"sla": 1.5}})
    rejected = client.reload()
    assert accepted["reloaded"] is True and rejected["reloaded"] is False
    assert "routing.sla" in rejected["error"]
    assert set(rejected) == set(accepted)
    assert rejected["models_changed"] == []


def test_a_failing_probe_never_probes_more_often_than_a_passing_one() -> None:
    """A failing probe backs off, doubling its wait up to 10 minutes; under a probe_interval_s over that (an
    hour, on a metered link) the cap brought the wait down to 10 minutes, so an outage probed six times as
    often as a working link. Now it backs off to the interval itself there."""
    hour = 3600.0
    waits = [hour]
    for _ in range(4):
        waits.append(next_probe_wait(waits[-1], False, hour))
    assert waits == [hour] * 5
    assert next_probe_wait(hour, True, hour) == hour

    waits = [30.0]  # the default interval: doubled to the 10 minutes, as before
    for _ in range(6):
        waits.append(next_probe_wait(waits[-1], False, 30.0))
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, PROBE_BACKOFF_S, PROBE_BACKOFF_S]
    assert next_probe_wait(PROBE_BACKOFF_S, True, 30.0) == 30.0


def test_a_tcp_endpoint_that_cannot_be_bound_stops_the_start_in_one_line(tmp_path: Path, models_dir: Path) -> None:
    """A `daemon.tcp` port another program holds ended the start in ZeroMQ's traceback, exit 1, where
    http.listen's is one line, `http_bind`; now the tcp endpoint's is too (`tcp_bind`, a config error: exit 2)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        endpoint = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        handle = start_daemon(tmp_path / "d", models_dir, {"daemon": {"tcp": endpoint}}, wait=False)
        assert handle.proc.wait(120) == 2
    log = handle.log()
    assert f"daemon.tcp: cannot serve on {endpoint} (Address already in use)" in log
    assert "Traceback" not in log


def test_a_tcp_endpoint_on_ipv6_loopback_serves(daemon_factory: Any) -> None:
    """The config takes `tcp://[::1]:PORT` for loopback, as http.listen's `[::1]:8080`, but ZeroMQ binds
    and connects to IPv6 only when asked: the start ended in a traceback ("No such device"), and a client
    could not connect. Now both sides ask."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        port = probe.getsockname()[1]
    endpoint = f"tcp://[::1]:{port}"
    daemon = daemon_factory({"daemon": {"tcp": endpoint}})
    with Client(endpoint) as client:
        assert client.status()["endpoints"][-1] == endpoint
        assert client.ask("Say hi.", max_tokens=2).done.outcome == "ok"
    assert daemon.rows()[-1]["outcome"] == "ok"


def test_status_says_there_is_no_cloud_endpoint_to_probe_without_one(daemon: DaemonHandle) -> None:
    """The probe is idle while no cloud model is configured (docs/configuration.md, [telemetry]), and `locod
    status` said "cloud endpoint not probed yet" for as long as the daemon ran, as if a probe were coming."""
    shown = daemon.cli("status")
    assert shown.returncode == 0, shown.stderr
    network = next(line for line in shown.stdout.splitlines() if line.strip().startswith("network"))
    assert "no cloud endpoint to probe" in network and "not probed yet" not in network
