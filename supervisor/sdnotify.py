"""A minimal sd_notify(3) client: tell systemd what the master is doing.

Without NOTIFY_SOCKET in the environment (not started by systemd with Type=notify) every call is a
no-op. A failed send is logged at debug and otherwise ignored: losing a status line must never stop
the master.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("supervisor")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None, logger: logging.Logger | None = None) -> None:
        env = os.environ if environ is None else environ
        self.log = logger or log
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # "@" marks Linux's abstract socket namespace
        self.address = address
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def fileno(self) -> int | None:
        return self._sock.fileno() if self._sock is not None else None

    def notify(self, *assignments: str) -> None:
        """Send one datagram, e.g. ``notify("READY=1", "STATUS=4 children up")``."""
        if self.address is None or not assignments:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # systemd reading slowly must not stall the master's loop.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(assignments).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            self.log.debug("sd_notify %r failed: %s", assignments, exc)

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        # Type=notify-reload services must send the monotonic time with RELOADING=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, line: str) -> None:
        self.notify(f"STATUS={line}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout systemd gave us), or None."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog is meant for another process of the unit
        except ValueError:
            return None
    return usec / 1_000_000 / 2
