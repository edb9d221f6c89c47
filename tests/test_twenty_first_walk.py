"""Walk 21: a laptop on the road. Unplugged and plugged in again, a captive portal in a café, an outage
and the way back online, and a daemon frozen (SIGSTOP, as a suspend plays it) while a turn waits.

Real parts throughout: the daemon with the embedded model, a power-supply tree it reads as its /sys, the
loopback cloud server behind the fault proxy, and a small HTTP server that plays the café's sign-in page.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from . import faultproxy
from .conftest import SECRET, CloudServer, DaemonHandle, cloud_config, free_port, locod_command, wait_for
from .faultproxy import Fault, FaultProxy


def laptop(root: Path, *, percent: int, plugged: bool, link_up: bool = True) -> Path:
    """A laptop's /sys as the daemon reads it: a battery, a mains adapter and a Wi-Fi link."""
    supplies = root / "class/power_supply"
    battery, mains = supplies / "BAT0", supplies / "AC"
    wifi = root / "class/net/wlan0"
    for folder in (battery, mains, wifi / "device", wifi / "wireless"):
        folder.mkdir(parents=True, exist_ok=True)
    files = {
        battery / "type": "Battery",
        battery / "present": "1",
        battery / "capacity": str(percent),
        battery / "status": "Charging" if plugged else "Discharging",
        battery / "power_now": "9000000",
        battery / "energy_now": str(percent * 500_000),
        mains / "type": "Mains",
        mains / "online": "1" if plugged else "0",
        wifi / "operstate": "up" if link_up else "down",
        wifi / "carrier": "1" if link_up else "0",
    }
    for path, text in files.items():
        path.write_text(text + "\n")
    return root


class SignInPage(BaseHTTPRequestHandler):
    """What a café's captive portal answers every request with until the user signs in: a 302 to its login
    page, or that page itself with 200 (``mode`` on the server)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        mode = getattr(self.server, "mode", "page")
        body = b"" if mode == "redirect" else b"<!DOCTYPE html><html><title>CafeWiFi</title><form>Accept</form></html>"
        self.send_response(302 if mode == "redirect" else 200)
        if mode == "redirect":
            self.send_header("Location", "http://login.cafewifi.example/?continue=api")
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


@pytest.fixture
def portal() -> Iterator[ThreadingHTTPServer]:
    server = faultproxy.serve(SignInPage)
    yield server
    faultproxy.shut(server)


def on_port(port: int) -> Any:
    """faultproxy.serve, on a given port: an endpoint that refused connections comes back where it was."""

    def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    return serve


def test_a_captive_portal_is_named_as_one(daemon_factory: Any, portal: ThreadingHTTPServer) -> None:
    """The café's Wi-Fi answers the cloud call with its sign-in page. Before, the 200 read as "the endpoint
    returned no answer text" and the 302 told the user to fix a base_url that was right."""
    config = cloud_config(f"http://127.0.0.1:{portal.server_address[1]}/v1", breaker_failures=100)
    d = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    page = d.cli("ask", "-v", "Name a lake.", "--max-tokens", "4")
    assert page.returncode == 0, page.stderr
    assert "captive portal" in page.stderr and "fallback via local" in page.stderr, page.stderr
    setattr(portal, "mode", "redirect")  # noqa: B010 - the handler reads it from its server
    redirect = d.cli("ask", "-v", "Name a sea.", "--max-tokens", "4")
    assert "captive portal" in redirect.stderr and "login.cafewifi.example" in redirect.stderr, redirect.stderr
    assert [row["error_code"] for row in d.rows()] == ["cloud_invalid_reply", "cloud_redirect"]


def test_offline_and_a_lossy_train_link_are_said_in_words(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A name that does not resolve said only "endpoint ... unreachable", and a stream the train's link cut
    "the answer stream broke after 1 characters: APIConnectionError"."""
    offline = daemon_factory(cloud_config("https://api.cloud-small.invalid/v1", max_retries=0), name="offline")
    unresolved = offline.cli("ask", "-v", "Name a lake.", "--max-tokens", "4")
    assert "does not resolve (is the device offline" in unresolved.stderr, unresolved.stderr
    train = daemon_factory(cloud_config(proxy.base_url, timeout_s=30.0), name="train")
    proxy.set(Fault(kind="cut", cut_after_chunks=3, times=1))
    cut = train.cli("ask", "-v", "Name a bird.", "--max-tokens", "12")
    assert "broke off after" in cut.stderr and "a slow or lossy network?" in cut.stderr, cut.stderr
    assert "fallback via local" in cut.stderr


def test_status_follows_what_the_cloud_calls_find(
    daemon_factory: Any, cloud_server: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe runs every 30 s, and backs off to 10 minutes while it fails: `locod status` said "cloud
    endpoint reachable" while turns fell back for want of a connection, and, after the outage, "unreachable"
    while the cloud answered turn after turn. A cloud call that finds other than the last probe now has the
    endpoint probed again at once (300 s, and 600 s of back-off, here: the test never waits them out)."""
    port = free_port()
    monkeypatch.setattr(faultproxy, "serve", on_port(port))
    upstream = cloud_server.base_url.rsplit("/v1", 1)[0]
    proxy = FaultProxy(upstream).start()
    config = cloud_config(f"http://127.0.0.1:{port}/v1", timeout_s=30.0, max_retries=0, breaker_failures=100)
    config["telemetry"] = {"probe_interval_s": 300.0}
    d = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = d.client()
    wait_for(lambda: client.status()["telemetry"]["cloud_reachable"], 30, "the first probe")
    proxy.stop()  # offline: the endpoint refuses
    failed = d.cli("ask", "-v", "Name a river.", "--max-tokens", "4")
    assert "fallback via local" in failed.stderr, failed.stderr
    wait_for(lambda: client.status()["telemetry"]["cloud_reachable"] is False, 60, "status to see the outage")
    proxy = FaultProxy(upstream).start()
    try:
        answered = d.cli("ask", "-v", "Name a colour.", "--max-tokens", "4")
        assert "via cloud cloud-small" in answered.stderr, answered.stderr
        wait_for(lambda: client.status()["telemetry"]["cloud_reachable"], 60, "status to see the endpoint back")
        assert "cloud endpoint reachable" in d.cli("status").stdout
    finally:
        proxy.stop()


def test_a_network_change_probes_at_once(daemon_factory: Any, tmp_path: Path) -> None:
    """The train leaves the station's Wi-Fi, and joins the next one: the endpoint is probed at each change,
    not after the probe's interval or the back-off failed probes built up; and status gives the last RTT
    with its age once the probe fails (it said "unreachable, RTT 0 ms", as if measured now)."""
    port = free_port()
    listening = on_port(port)(SignInPage)  # only a TCP connect is probed: any listener will do
    root = laptop(tmp_path / "sys", percent=60, plugged=False)
    config = cloud_config(f"http://127.0.0.1:{port}/v1")
    config["telemetry"] = {"sysfs_root": str(root), "probe_interval_s": 300.0, "nvml": False}
    d = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = d.client()
    wait_for(lambda: client.status()["telemetry"]["cloud_reachable"], 30, "the first probe")
    faultproxy.shut(listening)
    laptop(root, percent=60, plugged=False, link_up=False)
    wait_for(lambda: client.status()["telemetry"]["cloud_reachable"] is False, 60, "a probe on leaving the network")
    assert "offline (no network link), cloud endpoint unreachable, RTT n/a (the last, " in d.cli("status").stdout
    listening = on_port(port)(SignInPage)
    try:
        laptop(root, percent=60, plugged=False, link_up=True)
        wait_for(lambda: client.status()["telemetry"]["cloud_reachable"], 60, "a probe on joining the network")
    finally:
        faultproxy.shut(listening)


def test_plugging_in_is_not_a_broken_sensor(daemon_factory: Any, tmp_path: Path) -> None:
    """Unplugged, the battery reads the power drawn; plugged in, it stops, as it should. The log warned that
    power_w "stopped being readable" (once ever: a real failure later went unsaid)."""
    root = laptop(tmp_path / "sys", percent=50, plugged=False)
    d = daemon_factory({"telemetry": {"sysfs_root": str(root), "nvml": False}})
    client = d.client()
    wait_for(lambda: client.status()["telemetry"]["power_w"] == 9.0, 30, "the battery's power draw")
    laptop(root, percent=50, plugged=True)
    wait_for(lambda: client.status()["telemetry"]["on_ac"], 30, "mains power")
    assert client.status()["telemetry"]["power_w"] is None
    assert "stopped being readable" not in d.log()


def fill_backlog(path: str) -> list[socket.socket]:
    """Connect to a frozen daemon's socket until its backlog is full, as waiting clients' checks do."""
    held: list[socket.socket] = []
    for _ in range(5000):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            probe.close()
            return held
        held.append(probe)
    raise AssertionError("the backlog never filled")


def test_a_turn_waits_out_a_frozen_daemon(daemon: DaemonHandle) -> None:
    """The daemon is frozen (SIGSTOP) while `locod ask` waits. Once the socket's backlog filled (the client's
    own checks, one a second, fill it in under two minutes), the client gave up with "locod is not running
    ... start it with `locod serve`", while it ran; now it waits, and the answer comes after SIGCONT."""
    asking = subprocess.Popen(
        locod_command("--config", str(daemon.config_path), "ask", "Name a bird.", "--max-tokens", "8"),
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    daemon.proc.send_signal(signal.SIGSTOP)
    held: list[socket.socket] = []
    try:
        held = fill_backlog(daemon.endpoint.removeprefix("ipc://"))
        with pytest.raises(subprocess.TimeoutExpired):  # several of the client's checks meet the full backlog
            asking.wait(5)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
        for probe in held:
            probe.close()
    out, err = asking.communicate(timeout=120)
    assert asking.returncode == 0, err
    assert "not running" not in err and out.strip()
