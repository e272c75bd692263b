"""The child side of a fork: what a child body gets (`ChildContext`) and how a child starts and ends.

`run_child()` runs in the freshly forked process and never returns: whatever the body does, the
process ends in `os._exit()`, so no exception or return value can carry the child back into the
master's loop (where it would start acting as a second master).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterable, NoReturn

from .procs import die_with_parent, escape_control, flush_and_exit, forget_master, set_title
from .protocol import BEAT, Report

# How long a child forked by the image waits to be re-parented to the master (the image's middle
# process exits right after the fork, so this is normally well under a millisecond).
REPARENT_TIMEOUT = 2.0
MASTER_CHECK_INTERVAL = 0.1  # seconds between looks at the parent pid (the death signal usually comes first)


class ChildContext:
    """Handed to a slot's target in the child process.

    ``stopping`` is set when the master asks the child to go (SIGTERM or SIGINT): finish the task in
    hand, then return from the target. Call ``heartbeat()`` from the loop that does the work: a child
    that stops calling it for ``heartbeat_timeout`` seconds is killed and replaced.
    """

    def __init__(
        self,
        *,
        slot: str,
        group: str,
        index: int,
        master_pid: int,
        proc_name: str,
        heartbeat_fd: int,
        beat_interval: float = 1.0,
        generation: int = 0,
    ) -> None:
        self.slot = slot
        self.generation = generation
        self.orphaned = False  # the master closed our heartbeat pipe: it is gone or no longer knows us
        self.group = group
        self.index = index
        self.master_pid = master_pid
        self.stopping = threading.Event()
        self._proc_name = proc_name
        self._heartbeat_fd = heartbeat_fd
        # Each byte wakes the master; a body calling heartbeat() on every tick of a busy loop must
        # not turn that into thousands of wake-ups a second.
        self._beat_interval = beat_interval
        self._last_beat = float("-inf")
        self._master_checked = float("-inf")
        self._last_report: tuple | None = None
        self._last_title: str | None = None

    def __repr__(self) -> str:
        return f"<ChildContext {self.slot} master={self.master_pid}>"

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat < self._beat_interval:
            return
        self._last_beat = now
        self._write(BEAT)

    def report(self, state: str, task: str | None = None, task_id: str | None = None,
               age: float | None = None) -> None:
        """Tell the master what this child does now ("idle", "running" a task); sent on change only.

        A consumer reports "idle" once it consumes: the master counts it as up and able to work from
        then on, so a later death is a task's problem, not a failure to start.
        """
        key = (state, task, task_id)
        if key == self._last_report:
            return
        self._last_report = key
        line = Report(state, _bounded(task), _bounded(task_id), age).encode()
        self._last_beat = time.monotonic()
        self._write(line)

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._heartbeat_fd, data)
        except BlockingIOError:
            pass  # a full pipe: the master has beats it has not read yet
        except OSError:
            # Broken: the master is gone, or it dropped us (it never learnt our pid). Either way no
            # one supervises this process; master_alive() says so, and the body exits.
            self.orphaned = True

    def set_title(self, state: str) -> None:
        if state == self._last_title:
            return  # a system call saved on every loop turn
        self._last_title = state
        title = f"{self._proc_name}: {self.slot}"
        set_title(f"{title} {state}" if state else title)

    def master_alive(self) -> bool:
        """False once the master is gone (asked every loop turn: the parent is read at most every
        MASTER_CHECK_INTERVAL seconds)."""
        if self.orphaned:
            return False
        now = time.monotonic()
        if now - self._master_checked >= MASTER_CHECK_INTERVAL:
            self._master_checked = now
            self.orphaned = os.getppid() != self.master_pid
        return not self.orphaned


def _bounded(text: str | None, limit: int = 500) -> str | None:
    return None if text is None else escape_control(str(text))[:limit]


class _SignalRelay:
    """Turns SIGTERM/SIGINT/SIGUSR1 into work done on a thread of its own.

    A signal handler runs on the main thread between two bytecodes, possibly while that thread holds
    the lock inside `stopping.wait()`; calling `stopping.set()` or a log-reopening function from the
    handler could deadlock. The handler only writes the signal number to a pipe.
    """

    def __init__(self, ctx: ChildContext, reopen_logs: Callable[[], None] | None, logger: logging.Logger):
        self._ctx = ctx
        self._reopen_logs = reopen_logs
        self._log = logger
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self._forward)
        # Reload and scaling are the master's business. A Python-level no-op rather than SIG_IGN,
        # because SIG_IGN would be inherited by programs a task execs.
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, _ignore)
        # QUIT means "die now"; CHLD back to default so a body's own subprocesses can be waited for.
        for signum in (signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)

    def start(self) -> None:
        threading.Thread(target=self._relay, name="supervisor-signals", daemon=True).start()

    def _forward(self, signum: int, frame: object) -> None:
        try:
            os.write(self._write_fd, bytes([signum]))
        except OSError:
            pass

    def _relay(self) -> None:
        while True:
            data = os.read(self._read_fd, 64)
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._ctx.stopping.set()
                elif signum == signal.SIGUSR1 and self._reopen_logs is not None:
                    try:
                        self._reopen_logs()
                    except Exception:
                        self._log.exception("%s: reopening logs failed", self._ctx.slot)


def _ignore(signum: int, frame: object) -> None:
    pass


def exit_code_of(result: object) -> int:
    """The process exit code for what a target returned (None means success)."""
    if result is None:
        return 0
    if isinstance(result, int) and 0 <= result <= 255:
        return int(result)
    # os._exit(256) would report success; anything we cannot pass on faithfully is a failure.
    return 1


def run_child(
    ctx: ChildContext,
    target: Callable[[ChildContext], int | None],
    *,
    close_fds: Iterable[int],
    sigmask: Iterable[int] | None,
    reopen_logs: Callable[[], None] | None,
    on_fork: Callable[[], None] | None,
    logger: logging.Logger,
) -> NoReturn:
    """Everything a forked child does, from the first instruction after fork() to its exit."""
    code = 1
    try:
        # The master's wakeup fd (its self-pipe, closed below) must not receive this child's signals,
        # nor, once the number is reused, whatever file or socket gets that fd next.
        signal.set_wakeup_fd(-1)
        ctx.set_title("")
        _dump_stacks_on_abort()
        relay = _SignalRelay(ctx, reopen_logs, logger)
        relay.install()
        relay.start()
        if sigmask is not None:
            # The master blocked its signals around fork() so that a TERM sent to the new pid before
            # our handlers existed would not run the master's handler here; it is delivered now.
            signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
        forget_master(close_fds)
        _wait_for_master_as_parent(ctx.master_pid)
        die_with_parent()
        if os.getppid() != ctx.master_pid:
            # The master died between fork() and prctl(): PDEATHSIG will never fire for us.
            os._exit(0)
        if on_fork is not None:
            on_fork()
        code = exit_code_of(target(ctx))
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exit_code_of(exc.code)
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        logger.exception("%s (pid %d): child body raised", ctx.slot, os.getpid())
        code = 1
    finally:
        flush_and_exit(code)


def _wait_for_master_as_parent(master_pid: int) -> None:
    """A child forked by the image through a middle process becomes the master's (a subreaper) once
    that process exits. PDEATHSIG set before that would fire on the middle process's exit."""
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() != master_pid and time.monotonic() < deadline:
        time.sleep(0.0005)


_fault_file = None  # kept open for faulthandler, which writes to its descriptor from a signal handler


def _dump_stacks_on_abort() -> None:
    """The master sends SIGABRT to a child that stopped beating: every thread's stack goes to the log
    file (or stderr), so the hang can be diagnosed, before the default action ends the process."""
    global _fault_file
    stream = sys.stderr
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                # A file of our own: the handler's stream may be closed or reopened under us.
                _fault_file = stream = open(handler.baseFilename, "a")
            except OSError:
                pass
            break
    try:
        faulthandler.enable(file=stream, all_threads=True)
    except (ValueError, OSError, AttributeError):
        pass  # no usable file descriptor (a test's captured stderr): no stacks, still a clean abort
