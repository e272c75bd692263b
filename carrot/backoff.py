"""Waiting out an outage: capped exponential backoff, and one log line per change of state.

The one backoff of carrot's side (the generic supervisor keeps its own restart policy): the consumer
reconnecting to the broker and holding a message while the database is down, the relay per broker, the
scheduler per schedule and per tick. An `Outage` is logged when it starts, reminded of every
`reminder_every` seconds while it lasts, and logged again when it ends -- never once per retry.
"""
from __future__ import annotations

import logging
import random
import time


class Backoff:
    """Delays of base, 2*base, 4*base ... up to `cap`. With `jitter` each is scaled by a random factor
    in [0.5, 1], so many workers that lost the same service do not all come back in the same instant."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, jitter: bool = True):
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.failures = 0
        self.retry_at = 0.0  # monotonic; see wait_next()

    def next_delay(self) -> float:
        """The wait after one more failure."""
        delay = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay

    def wait_next(self) -> float:
        """Count a failure and set `retry_at` that far from now (for callers that poll, not sleep)."""
        delay = self.next_delay()
        self.retry_at = time.monotonic() + delay
        return delay

    def waiting(self) -> bool:
        """Whether `retry_at` is still ahead."""
        return time.monotonic() < self.retry_at

    def reset(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


class Outage:
    """The state of one dependency (the database, the broker) as one consumer sees it."""

    def __init__(self, logger: logging.Logger, name: str, what: str, cap: float = 30.0,
                 reminder_every: float = 60.0, base: float = 0.5):
        self.logger = logger
        self.name = name
        self.what = what
        self.backoff = Backoff(base, cap)
        self.reminder_every = reminder_every
        self.since: float | None = None
        self._last_reminder = 0.0

    def failed(self, reason: str, exc: BaseException | None = None) -> float:
        """Record a failed try; logs the start of the outage or a periodic reminder. Returns the delay
        before the next try."""
        now = time.monotonic()
        delay = self.backoff.next_delay()
        if self.since is None:
            self.since = self._last_reminder = now
            self.logger.warning('%s: %s is unavailable (%s); retrying with backoff (at most %gs apart)',
                                self.name, self.what, reason, self.backoff.cap)
            if exc is not None:
                self.logger.debug('%s: %s error in detail', self.name, self.what, exc_info=exc)
        elif now - self._last_reminder >= self.reminder_every:
            self._last_reminder = now
            self.logger.warning('%s: %s is still unavailable after %.0fs (%s)', self.name, self.what,
                                now - self.since, reason)
        return delay

    def recovered(self) -> None:
        if self.since is not None:
            self.logger.info('%s: %s is back after %.1fs', self.name, self.what,
                                time.monotonic() - self.since)
        self.since = None
        self.backoff.reset()
