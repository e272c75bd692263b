"""Operating-system helpers for the supervisor's processes: the master, its images and their children.

Process titles, the Linux process-tree controls (prctl: subreaper, parent-death signal), reaping, and
the one way out of a forked process. Nothing here knows what a slot or an image is.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Iterable, Iterator, NoReturn

from setproctitle import setproctitle

try:
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except (ImportError, OSError):  # a Python without ctypes, or no libc to load: no prctl() then
    _libc = None

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# A process forked from the master must not talk to systemd in the master's name; with
# NotifyAccess=all it could.
_MASTER_ONLY_ENVIRON = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


# -- titles ----------------------------------------------------------------------------------------

def escape_control(text: str) -> str:
    """`text` with control characters (and other unprintables) shown as escapes, for titles and logs."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def set_title(title: object) -> None:
    """Set the process title; never raises, whatever the text (it may come from a message)."""
    try:
        setproctitle(escape_control(str(title))[:1024])
    except Exception:
        pass


# -- the process tree ------------------------------------------------------------------------------

def _prctl(option: int, value: int) -> bool:
    if _libc is None:
        return False
    try:
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except (AttributeError, OSError):
        return False


def become_subreaper() -> bool:
    """Adopt orphaned descendants (the children the image forks through a middle process). Linux only."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies. Linux only; False elsewhere."""
    return _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def forget_master(fds: Iterable[int]) -> None:
    """In a process forked from the master: close the master's file descriptors `fds` and drop the
    environment that lets a process speak to systemd in the master's name."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    for name in _MASTER_ONLY_ENVIRON:
        os.environ.pop(name, None)


# -- exits -----------------------------------------------------------------------------------------

def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def describe_exit(code: int) -> str:
    """`code` (as os.waitstatus_to_exitcode() gives it) for the log: "exit code 1", "signal SIGKILL"."""
    return f"exit code {code}" if code >= 0 else f"signal {signal_name(-code)}"


def reaped() -> Iterator[tuple[int, int]]:
    """(pid, exit code) of every child of this process that has ended, without waiting (waitpid WNOHANG);
    a code below 0 is the signal that ended it."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def kill_and_reap(pids: Iterable[int]) -> None:
    """SIGKILL and wait for each of `pids` (children of this process)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def flush_and_exit(code: int) -> NoReturn:
    """End a forked process (an image, a child) with `code`, its last log lines written.

    A forked process must end in os._exit(): returning or raising would carry it back into the code of
    the process it was forked from, and a normal exit would run the atexit handlers it inherited. But
    os._exit() skips every buffer: without the flush the last log lines would be lost.
    """
    try:
        logging.shutdown()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
