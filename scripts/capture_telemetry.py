#!/usr/bin/env python3
"""Copy the sysfs/procfs files locod's telemetry readers open on this machine into a fixture tree.

Run it on the device whose layout a test should cover (a laptop on battery, a Jetson, a desktop); the
tree it writes (DEST/sys, DEST/proc) is what tests/fixtures/telemetry/ holds, byte for byte. It does not
keep its own list of paths: it runs the daemon's readers twice under an audit hook and copies every file
they opened, plus the directories whose mere existence the network reader checks.

    python scripts/capture_telemetry.py DEST [--sysfs /sys] [--procfs /proc]

Only sensor files are copied (power supplies, RAPL, INA3221 rails, thermal zones, CPU frequency, GPU
load, network interface state, /proc/stat and /proc/meminfo): no serial numbers, addresses or names.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from locod.daemon.telemetry import Readers

# The network reader tells interfaces apart by whether these exist (a directory or a symlink).
_NET_MARKERS = ("device", "wireless", "phy80211")


def opened_files(readers: Readers, roots: tuple[Path, ...]) -> set[Path]:
    """Every file under ``roots`` that the readers open during two samples a second apart."""
    opened: set[Path] = set()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], str | Path):
            path = Path(args[0])
            if any(path.is_relative_to(root) for root in roots):
                opened.add(path)

    sys.addaudithook(hook)  # audit hooks cannot be removed; this script is short-lived
    for _ in range(2):
        readers.power_supply(), readers.cpu(), readers.gpu(), readers.network()
        readers.rapl(time.time()), readers.ina3221()
        time.sleep(1.0)
    return opened


def capture(sysfs: Path, procfs: Path, dest: Path) -> list[Path]:
    readers = Readers(sysfs, procfs)
    copied = []
    for source in sorted(opened_files(readers, (sysfs, procfs))):
        root, name = (sysfs, "sys") if source.is_relative_to(sysfs) else (procfs, "proc")
        target = dest / name / source.relative_to(root)
        try:
            data = source.read_bytes()
        except OSError:
            continue  # unreadable here (permissions, a sensor that errors): the readers saw None too
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        copied.append(target)
    for iface in sorted((sysfs / "class/net").glob("*")):
        for marker in _NET_MARKERS:
            if (iface / marker).exists():
                keep = dest / "sys/class/net" / iface.name / marker / ".keep"
                keep.parent.mkdir(parents=True, exist_ok=True)
                keep.touch()
                copied.append(keep)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--sysfs", type=Path, default=Path("/sys"))
    parser.add_argument("--procfs", type=Path, default=Path("/proc"))
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    copied = capture(args.sysfs, args.procfs, args.dest)
    print(f"copied {len(copied)} files into {args.dest}")
    readers = Readers(args.dest / "sys", args.dest / "proc", nvml=False)  # NVML is no file a tree can hold
    seen = {**readers.power_supply(), **readers.cpu(), **readers.gpu(), **readers.network()}
    print("the readers see in the copy:", json.dumps(seen, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
