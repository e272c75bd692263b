"""Results committed without waiting for the disk, whose deliveries are acked once a flush has taken them.

Every result must be on disk before its delivery is acked: acked and then lost in a database crash, a task
would read as never finished, and nothing would run it again. A flush per task is the one cost that bounds
a worker on a small machine, and it need not be one per task: PostgreSQL flushes its log in order, so the
flush of one commit makes every earlier commit durable too. When the next delivery is already in hand (a
queue's 'prefetch' above 1), a worker writes a result without waiting, keeps its delivery unacked, and
acks the lot after the next commit that waits -- the last result of a run of deliveries, or a flush of its
own (carrot.commits.flush_to_disk) when the run ends otherwise or the next task takes a while.

A flush vouches only for commits made on the same server run: each result notes the server's start time,
and results written before a restart are never vouched for (their deliveries go back to the queue, and a
redelivery finds the row COMPLETED, or runs the task again if the crash took the row with it).
"""
from __future__ import annotations

import threading

from django.db import connections

from carrot.commits import commits_may_skip_the_disk, flush_to_disk, server_started


class UnflushedResults:
    """The results of this worker written without waiting for the disk and not yet flushed. The task
    thread writes; any thread (the task thread, the consumer's lease thread) may flush."""

    def __init__(self, using: str = 'default'):
        self.using = using
        self._lock = threading.Lock()
        self._since = None      # the server start time of the first unflushed result, None when there is none
        self._mixed = False     # unflushed results from more than one server run
        self._written = 0       # unflushed results written so far (a flush clears those it saw)
        self._usable: bool | None = None
        self._start_of = threading.local()  # per thread: (DB-API connection, its server's start time)

    @property
    def pending(self) -> bool:
        return self._since is not None

    def usable(self) -> bool:
        """Whether results may be written without waiting here: PostgreSQL, CARROT['async_commits'], and a
        server that lets us flush (tried once)."""
        if self._usable is None:
            connection = connections[self.using]
            self._usable = connection.vendor == 'postgresql' and commits_may_skip_the_disk() and \
                flush_to_disk(self.using) is not None
        return self._usable

    def wrote_unflushed(self) -> None:
        """A result was just committed without waiting, on this thread's connection."""
        started = self._server_start()
        with self._lock:
            if self._since is None:
                self._since = started
            elif started != self._since:
                self._mixed = True
            self._written += 1

    def wrote_flushed(self) -> bool | None:
        """A commit that waited was just made on this thread's connection: it flushed every earlier one.
        Returns whether the unflushed results are durable now (None: there were none)."""
        if self._since is None:
            return None
        return self._settle(self._server_start(), self._written)

    def flush(self) -> bool | None:
        """Flush now (from any thread). True: the unflushed results seen are durable; False: a server
        restart may have lost some; None: there were none. Raises DatabaseError when the flush fails."""
        with self._lock:
            if self._since is None:
                return None
            written = self._written
        return self._settle(flush_to_disk(self.using), written)

    def _settle(self, started, written: int) -> bool:
        with self._lock:
            durable = started is not None and started == self._since and not self._mixed
            if written == self._written:  # nothing written since: all of them settled
                self._since, self._mixed, self._written = None, False, 0
            return durable

    def _server_start(self):
        """The start time of the server behind this thread's connection, read once per connection."""
        connection = connections[self.using]
        connection.ensure_connection()
        known = getattr(self._start_of, 'value', None)
        if known is None or known[0] is not connection.connection:
            known = self._start_of.value = (connection.connection, server_started(self.using))
        return known[1]
