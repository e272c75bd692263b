"""Results committed without waiting for the disk, whose deliveries are acked once a flush has taken them.

Every result must be on disk before its delivery is acked: acked and then lost in a database crash, a task
would read as never finished, and nothing would run it again. A flush per task is the one cost that bounds
a worker on a small machine, and it need not be one per task: PostgreSQL flushes its log in order, so the
flush of one commit makes every earlier commit durable too. When the next delivery is already in hand (a
queue's 'prefetch' above 1), a worker writes a result without waiting, keeps its delivery unacked, and
acks it after the next commit that waits -- the last result of a run of deliveries, or a flush of its own
(carrot.commits.flush_to_disk) when the run ends otherwise, the next task takes a while, or the worker
stops.

A result may also be deferred: kept here, unwritten, to ride in the statement that claims the next
delivery (carrot.consume.claim.complete_then_take), one statement a task instead of two. Whoever comes
first writes it: the next claim, or any flush (which writes it durably, so a stop, a lost connection or a
long wait never leaves it behind).

Each result gets a number, and each write of one a stamp in the order the writes returned; a commit
that waits settles every result stamped before it was sent: durable, or -- when the server's start time
differs from the one the result was written under (read by the very statements, never remembered: a
pooler keeps a client connection across a server restart) -- perhaps lost. The consumer acks a delivery
whose number is settled durable and gives back (requeues) one that is perhaps lost: its redelivery finds
the row COMPLETED, or runs the task again if the crash took the row with it.
"""
from __future__ import annotations

import threading
from typing import Callable, NamedTuple

from django.db import DatabaseError, connections

from carrot.commits import commits_may_skip_the_disk, flush_to_disk


class Deferred(NamedTuple):
    """A result kept to be written with the next claim: its number and the row (completed, bounded)."""
    number: int
    row: object


class UnflushedResults:
    """The results of this worker not yet on disk. The task thread writes and defers; any thread (the task
    thread, the consumer's lease thread) may write a deferred one and settle them."""

    def __init__(self, using: str = 'default', write_durably: Callable | None = None,
                 write_many_durably: Callable | None = None):
        """`write_durably(row)` -> (written, server start): writes a deferred result in a commit that waits
        for the disk (None: nothing is ever deferred here); `write_many_durably(rows)` -> (primary keys
        written, server start): several in one such commit (None: one by one)."""
        self.using = using
        self._write_durably = write_durably
        self._write_many_durably = write_many_durably
        self._lock = threading.Lock()
        self._numbers = 0                    # results given a number so far (the last number given)
        self._writes = 0                     # writes recorded so far (the last stamp given)
        # number -> (start time of the server it was written to, stamp); (None, None) while deferred
        self._pending: dict[int, tuple] = {}
        self._settled: dict[int, bool] = {}     # number -> durable, until the consumer collects it
        self._deferred: list[Deferred] = []  # oldest first
        self._usable: bool | None = None

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    @property
    def deferred(self) -> bool:
        return bool(self._deferred)

    def usable(self) -> bool:
        """Whether results may be written without waiting here: PostgreSQL, CARROT['async_commits'], and a
        server that lets us flush (tried once it answers: until then, and while the database does not,
        False -- a result then waits for the disk, which is always safe, and its write waits out the fault)."""
        if self._usable is None:
            if not self.may_skip_the_disk():
                self._usable = False
            else:
                try:
                    self._usable = flush_to_disk(self.using) is not None
                except DatabaseError:  # a connection lost just now: never the task's failure
                    return False
        return self._usable

    def may_skip_the_disk(self) -> bool:
        """Whether commits here may skip the disk at all (PostgreSQL, CARROT['async_commits']), asking
        nothing of the server."""
        return connections[self.using].vendor == 'postgresql' and commits_may_skip_the_disk()

    def stamp(self) -> int:
        """The stamp of the last write recorded: a commit sent after this call flushes every write up to it."""
        with self._lock:
            return self._writes

    def wrote_unflushed(self, server_started) -> int:
        """A result was just committed without waiting, on a server that started at `server_started`.
        Returns its number."""
        with self._lock:
            self._numbers += 1
            self._writes += 1
            self._pending[self._numbers] = (server_started, self._writes)
            return self._numbers

    def wrote_flushed(self, server_started, upto: int) -> None:
        """A commit that waited was just made by the writing thread, on a server that started at
        `server_started`, sent after stamp `upto` (see stamp()): it flushed every result written before."""
        with self._lock:
            self._settle(server_started, upto)

    def defer(self, row) -> int:
        """Keep the result of `row` to be written with the next claim (see the module docstring); returns
        its number."""
        if self._write_durably is None:
            raise RuntimeError('results are not deferred here')
        with self._lock:
            self._numbers += 1
            self._pending[self._numbers] = (None, None)
            self._deferred.append(Deferred(self._numbers, row))
            return self._numbers

    def deferred_count(self) -> int:
        with self._lock:
            return len(self._deferred)

    def take_all_deferred(self) -> list[Deferred]:
        """Every deferred result, oldest first, now the caller's to write (or to give back)."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
            return deferred

    def take_deferred(self) -> Deferred | None:
        """The oldest deferred result, now the caller's to write (or to give back): None if there is none.
        There is seldom more than one: only while a flush that took one fails, or has it in hand."""
        with self._lock:
            return self._deferred.pop(0) if self._deferred else None

    def give_back(self, *deferred: Deferred) -> None:
        """Deferred results taken but not written: deferred again, before any deferred since."""
        with self._lock:
            self._deferred[:0] = deferred

    def wrote_deferred(self, deferred: Deferred, server_started, on_disk: bool = False) -> None:
        """The deferred result was just committed without waiting, on a server that started at
        `server_started`; `on_disk`: nothing of it is left to flush (its commit waited, or its row was
        deleted meanwhile)."""
        with self._lock:
            if on_disk:
                self._pending.pop(deferred.number, None)
                self._settled[deferred.number] = True
                return
            self._writes += 1
            self._pending[deferred.number] = (server_started, self._writes)

    def flush(self) -> None:
        """Flush now, from any thread, and settle what was written before; deferred results are written,
        each in a commit that waits for the disk. Raises DatabaseError when the flush fails (what was not
        written stays deferred)."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
            if not self._pending and not deferred:
                return
            upto = self._writes  # what a commit sent from now on flushes: never what is stamped meanwhile
        started = None
        try:
            if len(deferred) > 1 and self._write_many_durably is not None:
                written, started = self._write_many_durably([result.row for result in deferred])
                for result in deferred:
                    self.wrote_deferred(result, None, on_disk=True)
                deferred = []
            while deferred:
                written, started = self._write_durably(deferred[0].row)
                # Its own commit waited: durable, or nothing to flush (its row was deleted meanwhile).
                self.wrote_deferred(deferred.pop(0), None, on_disk=True)
                if not written:
                    started = None
            if started is None:
                started = flush_to_disk(self.using)
        except BaseException:
            self.give_back(*deferred)
            raise
        with self._lock:
            self._settle(started, upto)

    def verdict(self, number: int) -> bool | None:
        """Whether result `number` is durable (True), perhaps lost to a server restart (False), or not
        settled yet (None). A settled verdict is given once."""
        with self._lock:
            return self._settled.pop(number, None)

    def _settle(self, started, upto: int) -> None:
        for number in [n for n, (_, stamp) in self._pending.items() if stamp is not None and stamp <= upto]:
            self._settled[number] = started is not None and self._pending.pop(number)[0] == started
        if len(self._settled) > SETTLED_KEPT:  # verdicts nobody collects (their deliveries went with a channel)
            for number in sorted(self._settled)[:len(self._settled) - SETTLED_KEPT]:
                del self._settled[number]


SETTLED_KEPT = 1000  # far more than a consumer holds (prefetch is at most 100)
