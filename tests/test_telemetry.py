"""The real telemetry readers over fixture trees laid out as on real devices (tests/fixtures/telemetry/,
see its README), plus broken sensors and a hanging probe endpoint."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.config import load_config
from locod.daemon.telemetry import Readers, Snapshot, TelemetrySampler

from .conftest import wait_for, write_config

FIXTURES = Path(__file__).parent / "fixtures" / "telemetry"


class Quiet:
    upload_bps: float | None = None
    answered = 0
    unreachable = 0
    tokens_per_s: float | None = None

    def reached(self, hop: tuple[str, int], since: float) -> None:
        pass  # no breakers to end


def device(tmp_path: Path, name: str) -> Path:
    """A writable copy of a fixture tree, so a test can change sensor values between samples."""
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def sampler(root: Path, **overrides: str) -> TelemetrySampler:
    config = load_config(
        env={},
        overrides={
            "telemetry.sysfs_root": str(root / "sys"),
            "telemetry.procfs_root": str(root / "proc"),
            "telemetry.nvml": "false",  # the trees stand for devices without this machine's GPU, if any
            **overrides,
        },
    )
    return TelemetrySampler(config, Quiet(), Quiet())


def advance_cpu(root: Path, busy: int, idle: int) -> None:
    """Add jiffies to /proc/stat's cpu line, as the kernel would between two samples."""
    stat = root / "proc/stat"
    lines = stat.read_text().splitlines()
    values = [int(v) for v in lines[0].split()[1:]]
    values[0] += busy
    values[3] += idle
    lines[0] = "cpu  " + " ".join(map(str, values))
    stat.write_text("\n".join(lines) + "\n")


def two_samples(root: Path) -> Snapshot:
    s = sampler(root)
    s.sample()
    advance_cpu(root, busy=25, idle=75)
    return s.sample()


def test_laptop_on_battery(tmp_path: Path) -> None:
    snap = two_samples(device(tmp_path, "laptop-battery"))
    assert snap.battery_pct == 57 and snap.on_ac is False
    assert snap.power_w == pytest.approx(9.876) and snap.power_source == "battery"
    assert snap.battery_s_left == pytest.approx(31.2 / 9.876 * 3600)
    assert snap.cpu_pct == 25.0 and snap.cpu_mhz == 2000.0 and snap.cpu_temp_c == 52.0
    assert snap.throttled is False and snap.mem_available_mb == 9216.0
    assert snap.link == "wifi" and snap.online is True
    assert snap.gpu_pct is None and "gpu_pct" in snap.missing


def test_laptop_on_ac_without_battery_power_uses_rapl_across_a_wrap(tmp_path: Path) -> None:
    root = device(tmp_path, "laptop-ac")
    readers = Readers(root / "sys", root / "proc")
    assert readers.power_supply() == {"on_ac": True, "battery_pct": 100.0}
    assert readers.rapl(100.0) is None  # one reading gives no rate yet
    rapl = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    rapl.write_text("171150\n")  # wrapped past max_energy_range_uj (262143328850)
    assert readers.rapl(101.0) == pytest.approx((171150 + 262143328850 - 262143000000) / 1e6)
    rapl.write_text("2171150\n")
    assert readers.rapl(103.0) == pytest.approx(1.0)
    snap = two_samples(root)
    assert snap.link == "ethernet" and snap.power_source == "rapl" and snap.on_ac is True


def test_jetson_orin(tmp_path: Path) -> None:
    snap = two_samples(device(tmp_path, "jetson-orin"))
    # VDD_IN alone: the CPU/GPU/CV and SOC rails are inside it
    assert snap.power_w == pytest.approx(5.080 * 1.220, abs=1e-3) and snap.power_source == "ina3221"
    assert snap.gpu_pct == pytest.approx(45.7)
    assert snap.cpu_temp_c == 48.5 and snap.link == "ethernet"
    assert snap.battery_pct is None and snap.missing["battery_pct"] == "no battery in /sys/class/power_supply"


def test_desktop_without_battery(tmp_path: Path) -> None:
    snap = two_samples(device(tmp_path, "desktop"))
    assert snap.battery_pct is None and snap.on_ac is None and snap.power_w is None
    assert set(snap.missing) >= {"battery_pct", "on_ac", "power_w", "gpu_pct"}
    assert snap.link == "ethernet"  # the docker bridge and the veth are not the uplink
    assert snap.cpu_pct == 25.0 and snap.mem_available_mb == 51200.0


def test_h100_server_copied_from_a_real_machine(tmp_path: Path) -> None:
    """A tree scripts/capture_telemetry.py copied from a real cloud VM with an H100 (its GPU is NVML's)."""
    snap = two_samples(device(tmp_path, "h100-server"))
    assert snap.battery_pct is None and snap.power_w is None and snap.cpu_temp_c is None
    assert snap.link == "ethernet" and snap.online is True  # the down ifb* interfaces are ignored
    assert snap.cpu_pct == 25.0 and snap.mem_available_mb == pytest.approx(131450564 / 1024, abs=0.1)


@pytest.mark.parametrize("name", ["laptop-battery", "jetson-orin"])
def test_capture_script_copies_what_the_readers_need(tmp_path: Path, name: str) -> None:
    source = device(tmp_path, name)
    copy = tmp_path / "copy"
    script = Path(__file__).parents[1] / "scripts" / "capture_telemetry.py"
    subprocess.run(
        [sys.executable, str(script), str(copy), "--sysfs", str(source / "sys"), "--procfs", str(source / "proc")],
        check=True,
        capture_output=True,
    )
    original, copied = asdict(two_samples(source)), asdict(two_samples(copy))
    original.pop("taken"), copied.pop("taken")
    assert copied == original


def test_offline_when_no_physical_link_is_up(tmp_path: Path) -> None:
    root = device(tmp_path, "laptop-battery")
    (root / "sys/class/net/wlp2s0/operstate").write_text("down\n")
    snap = sampler(root).sample()
    assert snap.online is False and snap.link == "none"


def test_garbage_missing_and_unreadable_values_become_none_and_warn_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = device(tmp_path, "laptop-battery")
    s = sampler(root)
    assert s.sample().battery_pct == 57
    bat = root / "sys/class/power_supply/BAT0"
    (bat / "capacity").write_text("garbage\n")
    (bat / "power_now").unlink()
    (bat / "voltage_now").unlink()
    (root / "proc/meminfo").unlink()
    (root / "proc/meminfo").mkdir()  # a directory where a file should be: reading it fails
    with caplog.at_level(logging.WARNING, logger="locod.daemon.telemetry"):
        snaps = [s.sample() for _ in range(5)]
    assert all(x.battery_pct is None and x.mem_available_mb is None for x in snaps)
    assert snaps[-1].power_source == "rapl"  # the battery lost its power reading: RAPL takes over
    assert snaps[-1].on_ac is False and snaps[-1].cpu_temp_c == 52.0  # the rest still reads
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("battery_pct stopped being readable" in w for w in warnings) == 1
    (bat / "capacity").write_text("250\n")  # out of range
    assert s.sample().battery_pct is None


def test_snapshot_is_immutable_and_read_without_sampling(tmp_path: Path) -> None:
    s = sampler(device(tmp_path, "desktop"))
    first = s.sample()
    assert s.snapshot() is first and s.snapshot().row["link"] == "ethernet"
    with pytest.raises(AttributeError):
        first.link = "wifi"  # type: ignore[misc]


@pytest.fixture
def hanging_endpoint() -> Iterator[int]:
    """A loopback port whose accept queue is full: a TCP connect to it hangs until its timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    yield port
    filler.close()
    server.close()


def test_hanging_probe_marks_the_endpoint_not_the_device(daemon_factory: Any, hanging_endpoint: int) -> None:
    """An endpoint that does not answer the probe is reported unreachable; the device's own link decides
    whether it is online (a dead endpoint is not 'the device is offline'), and the daemon keeps serving."""
    handle = daemon_factory(
        {
            "telemetry": {"probe_interval_s": 1.0},
            "cloud": {"models": [{"name": "far", "base_url": f"http://127.0.0.1:{hanging_endpoint}/v1", "model": "m"}]},
        }
    )
    client = handle.client(timeout_s=5)
    wait_for(lambda: client.status()["telemetry"]["cloud_reachable"] is False, 30, "the probe to give up")
    telemetry = client.status()["telemetry"]
    assert telemetry["online"] == (telemetry["link"] not in ("none",))  # the link's word, not the probe's
    result = client.ask("Hello", max_tokens=2)  # the cloud may be tried (and time out): it is not masked
    assert result.done.outcome in ("ok", "fallback") and result.done.location == "local"
    assert "offline" not in result.decision.reason or telemetry["online"] is False
    assert client.ping()["pong"]


def test_reload_probes_the_new_cloud_endpoint_at_once(daemon_factory: Any) -> None:
    """The probe waits a minute between successful probes; a reload that moves the cloud to another endpoint
    has the new one probed at once."""
    with socket.socket() as first, socket.socket() as second:
        for endpoint in (first, second):
            endpoint.bind(("127.0.0.1", 0))
            endpoint.listen(8)
        config = {
            "telemetry": {"probe_interval_s": 60.0},
            "cloud": {
                "models": [{"name": "c", "base_url": f"http://127.0.0.1:{first.getsockname()[1]}/v1", "model": "m"}]
            },
        }
        handle = daemon_factory(config)
        client = handle.client()
        wait_for(lambda: client.status()["telemetry"]["rtt_ms"] is not None, 10, "the first endpoint's RTT")
        config["cloud"]["models"][0]["base_url"] = f"http://127.0.0.1:{second.getsockname()[1]}/v1"
        write_config(handle.config_path, config)
        assert client.reload()["reloaded"] is True
        second.settimeout(10)
        second.accept()[0].close()  # the probe connected (a TimeoutError here means it did not come)
        wait_for(lambda: client.status()["telemetry"]["rtt_ms"] is not None, 10, "the second endpoint's RTT")


def _nvml_devices() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no nvidia-ml-py, no driver or no GPU
        return 0


@pytest.mark.skipif(_nvml_devices() == 0, reason="needs an NVIDIA GPU, its driver and nvidia-ml-py (the gpu extra)")
def test_nvml_reader_follows_a_real_gpu_under_load(tmp_path: Path) -> None:
    """The NVML path on a real discrete GPU: utilisation, memory and power read, and they move when a
    kernel runs. The empty roots leave no Jetson load file, so the reader must take NVML."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch cannot reach the GPU to load it")
    readers = Readers(tmp_path, tmp_path)
    idle = readers.gpu()
    assert 0 <= idle["gpu_pct"] <= 100 and idle["gpu_mem_used_mb"] > 0 and idle["gpu_power_w"] > 0

    block = torch.randn(8192, 8192, device="cuda")  # 256 MiB, plus the product's
    busy = []
    for _ in range(10):  # each round keeps the GPU busy for a few hundred ms: NVML averages over ~1/6 s
        for _ in range(10):
            block = (block @ block).clamp_(-1, 1)
        torch.cuda.synchronize()
        busy.append(readers.gpu())
    assert max(reading["gpu_pct"] for reading in busy) >= 50
    assert max(reading["gpu_mem_used_mb"] for reading in busy) >= idle["gpu_mem_used_mb"] + 256
    assert max(reading["gpu_power_w"] for reading in busy) > idle["gpu_power_w"]

    snap = sampler(tmp_path, **{"telemetry.nvml": "true"}).sample()
    assert snap.gpu_pct is not None and "gpu_pct" not in snap.missing
