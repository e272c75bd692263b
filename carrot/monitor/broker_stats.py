"""Per-queue figures from RabbitMQ without the management plugin: a passive queue.declare answers with
the number of messages ready and of consumers. (AMQP does not report unacknowledged messages; the
monitor shows the IN_PROGRESS rows of the queue next to it instead.)

Every call is bounded: one connection per broker with short timeouts, and results are kept for a few
seconds so a page refreshed by several people does not hammer the broker. A broker that cannot be
reached is reported as unreachable, never raised.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from carrot.config import QueueConfig

CACHE_SECONDS = 3.0
TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class QueueStats:
    name: str
    state: str               # 'ok', 'not declared' or 'unreachable'
    ready: int | None = None
    consumers: int | None = None
    error: str = ''

    def as_dict(self) -> dict:
        return {'state': self.state, 'ready': self.ready, 'consumers': self.consumers, 'error': self.error}


_cache: dict[str, tuple[float, QueueStats]] = {}
_lock = threading.Lock()


def _stats_of(connection, name: str) -> QueueStats:
    from carrot.amqp.declare import QueueRefused, queue_counts

    try:
        counts = queue_counts(connection, name)
    except QueueRefused as exc:
        return QueueStats(name, 'unreachable', error=f'RabbitMQ said: {exc}')
    if counts is None:
        return QueueStats(name, 'not declared', 0, 0)
    return QueueStats(name, 'ok', *counts)


def _fetch(queues: list[QueueConfig]) -> dict[str, QueueStats]:
    """Stats of `queues`, one connection per broker."""
    from carrot.amqp.connection import close_quietly, connect, describe_connection_error

    results = {}
    by_broker: dict = {}
    for queue in queues:
        by_broker.setdefault(queue.broker, []).append(queue)
    for broker, members in by_broker.items():
        try:
            connection = connect(broker, socket_timeout=TIMEOUT_SECONDS, stack_timeout=TIMEOUT_SECONDS,
                                 blocked_connection_timeout=TIMEOUT_SECONDS, connection_attempts=1,
                                 retry_delay=0)
        except Exception as exc:  # any failure to connect (refused, timeout, auth) means "unreachable"
            reason = describe_connection_error(exc, broker)
            results.update({q.name: QueueStats(q.name, 'unreachable', error=reason) for q in members})
            continue
        try:
            for queue in members:
                try:
                    results[queue.name] = _stats_of(connection, queue.name)
                except Exception as exc:  # a connection lost half-way: what is left is unreachable
                    results[queue.name] = QueueStats(queue.name, 'unreachable',
                                                     error=f'{type(exc).__name__}: {exc}'[:200])
        finally:
            close_quietly(connection)
    return results


def queue_stats(queues: list[QueueConfig]) -> dict[str, QueueStats]:
    """Stats per queue name, at most CACHE_SECONDS old."""
    now = time.monotonic()
    with _lock:
        fresh = {q.name: _cache[q.name][1] for q in queues
                 if q.name in _cache and now - _cache[q.name][0] < CACHE_SECONDS}
    missing = [q for q in queues if q.name not in fresh]
    if missing:
        fetched = _fetch(missing)
        with _lock:
            for name, stats in fetched.items():
                _cache[name] = (time.monotonic(), stats)
        fresh.update(fetched)
    return fresh


def forget() -> None:
    """Drop cached figures (after a purge, and in tests)."""
    with _lock:
        _cache.clear()
