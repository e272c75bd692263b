"""What the master owes systemd: READY=1 once every slot is up, RELOADING=1 / READY=1 around a reload,
STATUS= lines when they change, WATCHDOG=1 on time. A passive part: the arbiter tells it what happens.
"""
from __future__ import annotations

import logging

from .sdnotify import Notifier


class Readiness:
    def __init__(self, notifier: Notifier, logger: logging.Logger) -> None:
        self.notifier = notifier
        self.log = logger
        self.ready_sent = False
        self.reloading = False
        self.since = 0.0
        self.last_status = ""
        self.next_watchdog = 0.0

    @property
    def awaiting(self) -> bool:
        return self.reloading or not self.ready_sent

    def starting(self, now: float) -> None:
        self.since = now
        if self.notifier.watchdog_interval:
            self.next_watchdog = now

    def reload_started(self, now: float) -> None:
        if not self.ready_sent:
            return  # a HUP while starting: the start takes the newest settings and ends in READY=1 as usual
        self.notifier.reloading()
        if not self.awaiting:
            self.since = now
        self.reloading = True

    def reload_failed(self, status: str) -> None:
        """The new image failed: the running set stays, and so does the READY=1 already sent."""
        was_reloading, self.reloading = self.reloading, False
        if was_reloading and self.ready_sent:
            self.notifier.ready(status)

    def all_up(self, now: float, count: int, status: str) -> None:
        if not self.awaiting:
            return
        if self.reloading:
            self.log.info("reload done in %.2fs", now - self.since)
        else:
            self.log.info("ready: %d children up in %.2fs", count, now - self.since)
        self.ready_sent, self.reloading = True, False
        self.last_status = status
        self.notifier.ready(status)

    def status(self, line: str) -> None:
        if line != self.last_status:
            self.last_status = line
            self.notifier.status(line)

    def watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + interval

    def deadline(self) -> float | None:
        return self.next_watchdog if self.notifier.watchdog_interval else None
