"""sd_notify spoken directly: one datagram to $NOTIFY_SOCKET per message, no library needed.

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so the daemon runs unchanged by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        # Taken out of the environment so that no child process (pip, a helper) speaks for the daemon.
        address = os.environ.pop("NOTIFY_SOCKET", None) if address is None else address
        self._sock: socket.socket | None = None
        self._address = ""
        if address:
            # "@name" is an abstract socket: the leading "@" stands for a NUL byte.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Ping at half the interval systemd expects, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(watchdog_usec) / 2e6 if watchdog_usec.isdigit() and mine else None

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def extend_start(self, seconds: float, status: str) -> None:
        """Ask systemd to wait ``seconds`` from now for the start, past TimeoutStartSec (a long migration)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
