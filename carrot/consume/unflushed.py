"""Results committed without waiting for the disk, whose deliveries are acked once a flush has taken them.

Every result must be on disk before its delivery is acked: acked and then lost in a database crash, a task
would read as never finished, and nothing would run it again. A flush per task is the one cost that bounds
a worker on a small machine, and it need not be one per task: PostgreSQL flushes its log in order, so the
flush of one commit makes every earlier commit durable too. When the next delivery is already in hand (a
queue's 'prefetch' above 1), a worker writes a result without waiting, keeps its delivery unacked, and
acks it after the next commit that waits -- the last result of a run of deliveries, or a flush of its own
(carrot.commits.flush_to_disk) when the run ends otherwise, the next task takes a while, or the worker
stops.

Each result written without waiting gets a number, and each commit that waits settles every number
written before it: durable, or -- when the server's start time differs from the one the result was
written under (read by the very statements, never remembered: a pooler keeps a client connection across a
server restart) -- perhaps lost. The consumer acks a delivery whose number is settled durable and gives back
(requeues) one that is perhaps lost: its redelivery finds the row COMPLETED, or runs the task again if the
crash took the row with it.
"""
from __future__ import annotations

import threading

from django.db import connections

from carrot.commits import commits_may_skip_the_disk, flush_to_disk


class UnflushedResults:
    """The results of this worker written without waiting for the disk. The task thread writes; any thread
    (the task thread, the consumer's lease thread) may settle them."""

    def __init__(self, using: str = 'default'):
        self.using = using
        self._lock = threading.Lock()
        self._numbers = 0                    # results written without waiting so far (the last number given)
        self._pending: dict[int, object] = {}   # number -> start time of the server it was written to
        self._settled: dict[int, bool] = {}     # number -> durable, until the consumer collects it
        self._usable: bool | None = None

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def usable(self) -> bool:
        """Whether results may be written without waiting here: PostgreSQL, CARROT['async_commits'], and a
        server that lets us flush (tried once)."""
        if self._usable is None:
            connection = connections[self.using]
            self._usable = connection.vendor == 'postgresql' and commits_may_skip_the_disk() and \
                flush_to_disk(self.using) is not None
        return self._usable

    def wrote_unflushed(self, server_started) -> int:
        """A result was just committed without waiting, on a server that started at `server_started`.
        Returns its number."""
        with self._lock:
            self._numbers += 1
            self._pending[self._numbers] = server_started
            return self._numbers

    def wrote_flushed(self, server_started) -> None:
        """A commit that waited was just made by the writing thread, on a server that started at
        `server_started`: it flushed every result written before it."""
        with self._lock:
            self._settle(server_started, self._numbers)

    def flush(self) -> None:
        """Flush now, from any thread, and settle what was written before. Raises DatabaseError when the
        flush fails."""
        with self._lock:
            if not self._pending:
                return
            upto = self._numbers
        started = flush_to_disk(self.using)
        with self._lock:
            self._settle(started, upto)

    def verdict(self, number: int) -> bool | None:
        """Whether result `number` is durable (True), perhaps lost to a server restart (False), or not
        settled yet (None). A settled verdict is given once."""
        with self._lock:
            return self._settled.pop(number, None)

    def _settle(self, started, upto: int) -> None:
        for number in [n for n in self._pending if n <= upto]:
            self._settled[number] = started is not None and self._pending.pop(number) == started
        if len(self._settled) > SETTLED_KEPT:  # verdicts nobody collects (their deliveries went with a channel)
            for number in sorted(self._settled)[:len(self._settled) - SETTLED_KEPT]:
                del self._settled[number]


SETTLED_KEPT = 1000  # far more than a consumer holds (prefetch is at most 100)
