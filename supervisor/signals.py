"""The master's signal queue: handlers only note the signal and wake the loop, which does the work.

A Python signal handler runs on the main thread between two bytecodes, anywhere in the master's code;
doing real work there (forking, logging) would re-enter whatever was interrupted. So the handler
appends the signal to a queue and the loop pops it at the top of its next turn.
"""
from __future__ import annotations

import os
import select
import signal
from typing import Iterable

# The signals a master acts on (see supervisor.arbiter). CHLD only wakes its loop and is not in this list.
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN,
                  signal.SIGTTOU)


def hold_master_signals() -> None:
    """Block the master's signals from a program's first line until SignalQueue.install() takes them: one
    sent while the program starts (a reload right after start, an impatient Ctrl-C) then waits for the
    loop instead of ending the process by its default action."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)


def release_master_signals() -> None:
    """Unblock them where no master loop will take them (e.g. a --check run)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)


class SignalQueue:
    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signals)
        self.pending: list[int] = []
        self.wake_r = self.wake_w = -1
        self._saved_handlers: dict[int, object] = {}
        self._saved_wakeup_fd: int | None = None

    def install(self, poller: select.poll) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        poller.register(self.wake_r, select.POLLIN)
        for signum in self.signals:
            self._saved_handlers[signum] = signal.signal(signum, self._received)
        # CPython runs a Python handler between two bytecodes, not when the signal arrives: a signal
        # landing just before poll() blocks would have its wake-up byte deferred until poll() timed
        # out. The wakeup fd is written by the C-level handler at once.
        self._saved_wakeup_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        # The caller may have held (blocked) them until its handlers were in place, so that a signal sent
        # while it started was not fatal; one that arrived meanwhile is delivered, and queued, now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def fds(self) -> list[int]:
        """Descriptors a forked process must close."""
        return [fd for fd in (self.wake_r, self.wake_w) if fd >= 0]

    def _received(self, signum: int, frame: object) -> None:
        # CHLD only needs the loop awake (the wakeup fd did that); queueing one per exit would flood.
        if signum != signal.SIGCHLD:
            self.pending.append(signum)

    def pop(self) -> int | None:
        return self.pending.pop(0) if self.pending else None

    def drain(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def restore(self) -> None:
        if self._saved_wakeup_fd is not None:
            signal.set_wakeup_fd(self._saved_wakeup_fd)
            self._saved_wakeup_fd = None
        for signum, handler in self._saved_handlers.items():
            # None means a handler installed outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # type: ignore[arg-type]
        self._saved_handlers.clear()
        for fd in self.fds():
            os.close(fd)
        self.wake_r = self.wake_w = -1

