"""Device and network state, sampled off the request path into an immutable snapshot.

A sampler thread refreshes the snapshot every ``telemetry.interval_s``; a turn reads the latest one, an
attribute read. Every reader takes the sysfs/procfs roots from the config, so tests run these very
readers over fixture trees copied from real machines (tests/fixtures/telemetry/). A signal a device does
not have is ``None`` with a reason; a reader that fails is warned about once, not every second.
"""

from __future__ import annotations

import base64
import functools
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from locod.daemon.config import Config
from locod.daemon.proxy import Route, route

log = logging.getLogger(__name__)
TUNNEL_WAIT_S = 5.0  # how long the probe waits for a proxy's answer to its CONNECT (it connects to the endpoint first)
PROBE_BACKOFF_S = 600.0  # the longest wait a failing probe doubles to, unless probe_interval_s is longer


@dataclass(frozen=True)
class Snapshot:
    taken: float = 0.0  # time.time() of the sample
    battery_pct: float | None = None
    on_ac: bool | None = None
    battery_s_left: float | None = None
    power_w: float | None = None
    power_source: str | None = None  # battery | rapl | ina3221
    cpu_pct: float | None = None
    cpu_mhz: float | None = None
    cpu_temp_c: float | None = None
    throttled: bool | None = None
    mem_available_mb: float | None = None
    gpu_pct: float | None = None
    gpu_mem_used_mb: float | None = None
    gpu_power_w: float | None = None
    online: bool | None = None  # the device's own link
    cloud_reachable: bool | None = None  # the last probe of the default cloud endpoint
    # What it reached: "endpoint"; "tunnel" (through cloud_proxy, to the endpoint); "proxy" (cloud_proxy only:
    # an http endpoint's calls are forwarded, with no tunnel to ask for, or the proxy is an https one)
    cloud_probed: str | None = None
    cloud_proxy: str | None = None  # host:port of the proxy the calls go through
    link: str = "unknown"  # ethernet | wifi | cellular | none | unknown
    rtt_ms: float | None = None
    rtt_age_s: float | None = None
    upload_bps: float = 0.0
    upload_measured: bool = False
    local_tokens_per_s: float | None = None
    joules_per_token: float | None = None
    missing: dict[str, str] = field(default_factory=dict)  # signal -> why it is None

    @functools.cached_property
    def row(self) -> dict[str, Any]:
        """As the decision record and ``status`` show it: made once per sample, not once per turn."""
        return asdict(self)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def mem_available_mb(procfs: Path) -> float | None:
    """The memory the system can give without swapping (``MemAvailable`` of ``procfs``/meminfo), in MiB;
    None where that cannot be read."""
    for line_text in (_read(procfs / "meminfo") or "").splitlines():
        if line_text.startswith("MemAvailable:"):
            try:
                return round(float(line_text.split()[1]) / 1024, 1)
            except (IndexError, ValueError):
                return None
    return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


class Readers:
    """Each method reads one family of signals from the configured roots, keeping the state it needs
    between samples (CPU jiffies, RAPL counters). Garbage reads as None."""

    def __init__(self, sysfs: Path, procfs: Path, nvml: bool = True) -> None:
        self.sys, self.proc = sysfs, procfs
        self._cpu_prev: tuple[float, float] | None = None
        self._rapl_prev: tuple[float, float, float] | None = None  # energy_uj, max_range, time
        self._throttle_prev: float | None = None
        self._nvml: Any = None
        self._nvml_tried = not nvml
        # Why NVML gives no reading, as status's `missing` says it: a driver without the gpu extra is not
        # "no device", and only the first is the user's to fix.
        self.nvml_absent = "no NVML device" if nvml else "NVML not read (telemetry.nvml = false)"

    def power_supply(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        supplies = sorted((self.sys / "class/power_supply").glob("*"))
        batteries = [s for s in supplies if _read(s / "type") == "Battery" and _read(s / "present") != "0"]
        mains = [s for s in supplies if _read(s / "type") in ("Mains", "USB", "USB_C", "USB_PD")]
        if mains:
            out["on_ac"] = any(_read(s / "online") == "1" for s in mains)
        if batteries:
            bat = batteries[0]
            capacity = _number(bat / "capacity")
            out["battery_pct"] = capacity if capacity is not None and 0 <= capacity <= 100 else None
            status = _read(bat / "status") or ""
            if "on_ac" not in out:
                out["on_ac"] = status in ("Charging", "Full", "Not charging")
            power = _number(bat / "power_now")
            if power is None:
                current, voltage = _number(bat / "current_now"), _number(bat / "voltage_now")
                power = current * voltage / 1e6 if current is not None and voltage is not None else None
            if power is not None and power > 0 and status == "Discharging":
                out["power_w"] = power / 1e6
                out["power_source"] = "battery"
                energy = _number(bat / "energy_now")
                if energy is None:
                    charge, voltage = _number(bat / "charge_now"), _number(bat / "voltage_now")
                    energy = charge * voltage / 1e6 if charge is not None and voltage is not None else None
                if energy is not None:
                    out["battery_s_left"] = energy / power * 3600
        return out

    def rapl(self, now: float) -> float | None:
        """Package power from Intel RAPL's energy counter, handling its wrap at max_energy_range_uj; ``now``
        is monotonic: a wall clock set forward by an hour would read as a thousandth of the power."""
        zone = self.sys / "class/powercap/intel-rapl:0"
        energy, max_range = _number(zone / "energy_uj"), _number(zone / "max_energy_range_uj")
        if energy is None:
            return None
        prev, self._rapl_prev = self._rapl_prev, (energy, max_range or 0.0, now)
        if prev is None or now <= prev[2]:
            return None
        delta = energy - prev[0]
        if delta < 0:
            delta += max_range or 0.0
        return delta / 1e6 / (now - prev[2]) if delta >= 0 else None

    def ina3221(self) -> float | None:
        """Jetson board power from the INA3221 rails (hwmon: in*_input mV x curr*_input mA).

        The input rail (VDD_IN, POM_5V_IN, 5V_IN) already includes the others, so it is used alone when
        present; otherwise the rails are summed.
        """
        rails: dict[str, float] = {}
        for hwmon in sorted(self.sys.glob("bus/i2c/drivers/ina3221*/*/hwmon/hwmon*")):
            for volt_file in sorted(hwmon.glob("in*_input")):
                channel = volt_file.name[2:-6]
                label = _read(hwmon / f"in{channel}_label") or ""
                mv, ma = _number(volt_file), _number(hwmon / f"curr{channel}_input")
                if label and mv is not None and ma is not None:
                    rails[label] = mv * ma / 1e6
        inputs = [watts for label, watts in rails.items() if label.upper() in ("VDD_IN", "POM_5V_IN", "5V_IN")]
        if inputs:
            return sum(inputs)
        return sum(rails.values()) if rails else None

    def cpu(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        line = (_read(self.proc / "stat") or "").splitlines()[:1]
        parts = line[0].split() if line else []
        if parts[:1] == ["cpu"] and len(parts) >= 5:
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                values = []
            if values:
                idle = values[3] + (values[4] if len(values) > 4 else 0.0)
                total = sum(values[:8])
                prev, self._cpu_prev = self._cpu_prev, (idle, total)
                if prev is not None and total > prev[1]:
                    out["cpu_pct"] = round(100.0 * (1 - (idle - prev[0]) / (total - prev[1])), 1)
        freqs = [
            f for f in (_number(p) for p in self.sys.glob("devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")) if f
        ]
        if freqs:
            out["cpu_mhz"] = round(sum(freqs) / len(freqs) / 1000, 1)
        temps = [
            t for t in (_number(p) for p in self.sys.glob("class/thermal/thermal_zone*/temp")) if t and 0 < t < 150_000
        ]
        if temps:
            out["cpu_temp_c"] = max(temps) / 1000
        counts = [
            c
            for c in (
                _number(p) for p in self.sys.glob("devices/system/cpu/cpu*/thermal_throttle/package_throttle_count")
            )
            if c is not None
        ]
        if counts:
            prev_count, self._throttle_prev = self._throttle_prev, sum(counts)
            out["throttled"] = prev_count is not None and sum(counts) > prev_count
        available = mem_available_mb(self.proc)
        if available is not None:
            out["mem_available_mb"] = available
        return out

    def gpu(self) -> dict[str, Any]:
        jetson = [
            self.sys / "devices/gpu.0/load",
            self.sys / "devices/platform/gpu.0/load",
            *sorted(self.sys.glob("devices/platform/*.ga10b/load")),
            *sorted(self.sys.glob("devices/platform/*.gv11b/load")),
        ]
        for load_file in jetson:
            load = _number(load_file)
            if load is not None:
                return {"gpu_pct": load / 10.0}  # Jetson reports per mille
        nvml = self._nvml_handle()
        if nvml is None:
            return {}
        pynvml, handle = nvml
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out = {"gpu_pct": float(util.gpu), "gpu_mem_used_mb": mem.used / 2**20}
            try:
                out["gpu_power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except pynvml.NVMLError:
                pass
            return out
        except pynvml.NVMLError:
            return {}

    def _nvml_handle(self) -> tuple[Any, Any] | None:
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            except ImportError:
                self._nvml = None
                if (self.proc / "driver/nvidia/version").exists():  # the driver is loaded: a GPU is there
                    self.nvml_absent = "nvidia-ml-py, the gpu extra, is not installed (pip install '.[gpu]')"
            except Exception:  # no driver or no device: simply no NVML
                self._nvml = None
        return self._nvml

    def network(self) -> dict[str, Any]:
        kinds = []
        for iface in sorted((self.sys / "class/net").glob("*")):
            if iface.name == "lo" or _read(iface / "operstate") not in ("up", "unknown"):
                continue
            if _read(iface / "carrier") == "0" or not (iface / "device").exists():
                continue  # virtual interfaces (bridges, veth, docker) say nothing about the uplink
            if (iface / "wireless").exists() or (iface / "phy80211").exists():
                kinds.append("wifi")
            elif iface.name.startswith(("wwan", "rmnet", "usb")) or _read(iface / "type") in ("519", "530"):
                kinds.append("cellular")
            else:
                kinds.append("ethernet")
        for preferred in ("ethernet", "wifi", "cellular"):
            if preferred in kinds:
                return {"link": preferred, "online": True}
        return {"link": "none", "online": False}


class _Cloudish(Protocol):
    upload_bps: float | None
    answered: int  # cloud calls answered so far: one after the probe failed says an endpoint is back
    unreachable: int  # cloud calls that found no connection: one after the probe passed says it is gone

    def reached(self, hop: tuple[str, int], since: float) -> None: ...  # a probe begun at ``since`` connected


class _Localish(Protocol):
    tokens_per_s: float | None


class TelemetrySampler:
    def __init__(self, config: Config, cloud: _Cloudish, local: _Localish) -> None:
        self.config = config.telemetry
        self.readers = Readers(Path(self.config.sysfs_root), Path(self.config.procfs_root), self.config.nvml)
        self.cloud, self.local = cloud, local
        self.probe_target = _probe_target(config)
        self._snapshot = Snapshot()
        self._stop = threading.Event()
        self._probe_now = threading.Event()  # ends the probe's back-off early: a new endpoint, link or answer
        self._rtt: tuple[float, float] | None = None  # (ms, monotonic time measured)
        self._probe_ok: bool | None = None
        self._warned: set[str] = set()
        self._present: set[str] = set()  # signals seen at least once: losing one is worth a warning
        self._heard: tuple[str | None, int, int] | None = None  # the link and the cloud's calls at the last sample
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.sample()
        self._threads = [
            threading.Thread(target=self._run, name="telemetry", daemon=True),
            threading.Thread(target=self._probe_loop, name="rtt-probe", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def retarget(self, config: Config) -> None:
        """After a reload: probe the (possibly new) default cloud endpoint, or none."""
        if _probe_target(config) != self.probe_target:
            self.probe_target = _probe_target(config)
            self._rtt = self._probe_ok = None
            self._probe_now.set()

    def stop(self) -> None:
        self._stop.set()
        self._probe_now.set()

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            self.sample()

    def sample(self) -> Snapshot:
        now = time.time()
        values: dict[str, Any] = {}
        for name, read in (
            ("power_supply", self.readers.power_supply),
            ("cpu", self.readers.cpu),
            ("gpu", self.readers.gpu),
            ("network", self.readers.network),
        ):
            try:
                values.update(read())
            except Exception as exc:  # a broken sensor must not stop the others
                self._warn_once(name, f"telemetry reader {name} failed: {exc!r}")
        if "power_w" not in values:
            for source, read_power in (
                ("rapl", lambda: self.readers.rapl(time.monotonic())),
                ("ina3221", self.readers.ina3221),
            ):
                try:
                    watts = read_power()
                except Exception as exc:
                    self._warn_once(source, f"telemetry reader {source} failed: {exc!r}")
                    continue
                if watts is not None:
                    values.update(power_w=round(watts, 3), power_source=source)
                    break
        self._probe_on_news(values.get("link"), self.cloud.answered, self.cloud.unreachable)
        values["cloud_reachable"] = self._probe_ok  # the endpoint, not the device: breakers judge endpoints
        values.update(_probed(self.probe_target) if self._probe_ok is not None else {})
        if self._rtt is not None:
            values["rtt_ms"] = round(self._rtt[0], 2)
            values["rtt_age_s"] = round(time.monotonic() - self._rtt[1], 1)
        measured = self.cloud.upload_bps
        values["upload_bps"] = measured if measured is not None else self.config.bandwidth_prior_bps
        values["upload_measured"] = measured is not None
        tps = self.local.tokens_per_s
        values["local_tokens_per_s"] = round(tps, 2) if tps else None
        if tps and values.get("power_w"):
            values["joules_per_token"] = round(values["power_w"] / tps, 4)
        missing = {name: _why_missing(name, self.readers.nvml_absent) for name in _OPTIONAL if values.get(name) is None}
        for name in missing:
            # A battery reads its power only while discharging: plugged in, power_w goes as it should.
            if name in self._present and not (name == "power_w" and values.get("on_ac")):
                self._warn_once(name, f"telemetry: {name} stopped being readable; reporting None")
        self._present.update(name for name in _OPTIONAL if values.get(name) is not None)
        snap = Snapshot(taken=now, missing=missing, **values)
        self._snapshot = snap
        return snap

    def _probe_on_news(self, link: str | None, answered: int, unreachable: int) -> None:
        """Probe now, not after the interval or a back-off of up to 10 minutes, when the network may have
        changed: the link did (another network joined, a cable plugged in), or a cloud call said other than
        the last probe (answered after it failed: a captive portal signed into, an outage over; no connection
        after it passed). Else `locod status` went on saying "unreachable" while turns were answered there,
        or "reachable" while they fell back."""
        heard, self._heard = self._heard, (link, answered, unreachable)
        if heard is None:
            return
        back = heard[1] != answered and self._probe_ok is False
        gone = heard[2] != unreachable and self._probe_ok is True
        if heard[0] != link or back or gone:
            self._probe_now.set()

    def _probe_loop(self) -> None:
        """TCP-connect RTT to the cloud endpoint, at a low rate, backing off while it fails; idle while no
        cloud model is configured."""
        backoff = self.config.probe_interval_s
        while not self._stop.is_set():
            target = self.probe_target
            if target is not None:
                self._probe_ok = self._probe(target)
                backoff = next_probe_wait(backoff, self._probe_ok, self.config.probe_interval_s)
            if self._probe_now.wait(backoff if target is not None else self.config.probe_interval_s):
                self._probe_now.clear()
                backoff = self.config.probe_interval_s

    def _probe(self, target: Route) -> bool:
        """One probe: a TCP connection to the first hop (its time is the RTT) and, through a proxy to an https
        endpoint, the tunnel its calls ask the proxy for. The connection alone says the network is there (the
        breakers it vouches for may try); whether the endpoint is reached is the tunnel's answer: a proxy
        that answered while the endpoint behind it was down was reported as the endpoint reachable."""
        began, started = time.monotonic(), time.perf_counter()
        try:
            with socket.create_connection(target.hop, timeout=2.0) as conn:
                self._rtt = ((time.perf_counter() - started) * 1000, time.monotonic())
                self.cloud.reached(target.hop, began)
                return target.tunnel is None or _tunnel_opens(conn, target)
        except OSError:
            return False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s (further failures of this reader are not logged)", message)


_OPTIONAL = ("battery_pct", "on_ac", "power_w", "cpu_temp_c", "gpu_pct", "rtt_ms")


def _why_missing(name: str, nvml_absent: str) -> str:
    return {
        "battery_pct": "no battery in /sys/class/power_supply",
        "on_ac": "no mains or battery status in /sys/class/power_supply",
        "power_w": "no discharging battery, RAPL counter or INA3221 rail",
        "cpu_temp_c": "no readable thermal zone",
        "gpu_pct": f"no Jetson GPU load file, and {nvml_absent}",
        "rtt_ms": "no cloud endpoint probed yet",
    }[name]


def _probe_target(config: Config) -> Route | None:
    """How the default cloud model's requests go: to its endpoint, or through a proxy."""
    return route(config.cloud_model(config.cloud.default), config.source) if config.cloud.models else None


def _probed(target: Route | None) -> dict[str, str | None]:
    """The snapshot's words for what a probe of ``target`` reaches (``cloud_probed``, ``cloud_proxy``)."""
    if target is None:
        return {}
    if target.proxy is None:
        return {"cloud_probed": "endpoint"}
    host, port = target.hop
    proxy = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {"cloud_probed": "proxy" if target.tunnel is None else "tunnel", "cloud_proxy": proxy}


def _tunnel_opens(conn: socket.socket, target: Route) -> bool:
    """Whether the proxy at the other end of ``conn`` opens the tunnel to the endpoint that the calls ask it
    for (``CONNECT``, with the proxy URL's credentials as they send them): a 2xx answer within TUNNEL_WAIT_S
    (403: the host is not allowed through it; 502 or 504: it could not reach it). Nothing is sent through."""
    assert target.tunnel is not None and target.proxy is not None
    host, port = target.tunnel
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {where} HTTP/1.1", f"Host: {where}"]
    proxy = urlsplit(target.proxy)
    if proxy.username is not None:
        credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}")
    conn.settimeout(TUNNEL_WAIT_S)
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    status = conn.makefile("rb").readline(1024).split()
    return len(status) >= 2 and status[0].startswith(b"HTTP/") and status[1].startswith(b"2")


def next_probe_wait(waited: float, passed: bool, interval: float) -> float:
    """Seconds to the next probe: ``interval`` after one that passed; after one that failed, twice the last
    wait, up to PROBE_BACKOFF_S or ``interval`` if longer. Capped at PROBE_BACKOFF_S alone, a failing probe
    under a probe_interval_s of an hour (a metered link) probed every 10 minutes, six times as often."""
    return interval if passed else min(waited * 2, max(PROBE_BACKOFF_S, interval))
