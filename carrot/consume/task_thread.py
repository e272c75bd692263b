"""The task thread: one executor thread that runs one job at a time, so the connection thread stays free.

The connection thread submits a job (a run of deliveries, carrot.consume.loop) and keeps servicing the
broker; the thread wakes it when the job is done. A job that overruns the time limit cannot be stopped
(Python threads cannot be killed): the thread is abandoned and the process is expected to end.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from django.db import connections


@dataclass
class Delivery:
    """The message in the task thread, as the connection thread (and the supervisor's status) sees it."""
    delivery_tag: int
    task: str                      # safe to show: escaped and bounded
    message_id: str | None
    started: float = field(default_factory=time.monotonic)
    future: Future | None = None
    message: object = None         # the IncomingMessage
    abandoned: threading.Event = field(default_factory=threading.Event)  # set when the delivery is gone
    flush_number: int | None = None  # its result's, while it waits for a flush (carrot.consume.unflushed)

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    @property
    def done(self) -> bool:
        return self.future is not None and self.future.done()


class TaskThread:
    """A single worker thread with a name, for the jobs of one consumer."""

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f'carrot-{name}')
        self.abandoned = False

    def submit(self, job: Callable, *args, on_done: Callable[[], None] | None = None) -> Future:
        future = self._executor.submit(job, *args)
        if on_done is not None:
            future.add_done_callback(lambda _: on_done())
        return future

    def wait(self, future: Future, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `future`; True when it is done."""
        try:
            future.exception(timeout=timeout)
        except TimeoutError:
            return False
        return True

    def abandon(self) -> None:
        """Give up on a job that overran: its thread keeps running until the process ends."""
        self.abandoned = True
        self._executor.shutdown(wait=False)

    def close(self) -> None:
        """Close the task thread's database connections (from that thread) and end it."""
        if self.abandoned:
            return
        try:
            self._executor.submit(connections.close_all).result(timeout=30)
        except Exception:  # closing a dead connection can fail; the thread ends anyway
            pass
        self._executor.shutdown(wait=True)
