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

from setproctitle import getproctitle, setproctitle

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


def make_room_for_titles() -> None:
    """Let setproctitle find the memory titles are written to, before anything changes the environment. It
    finds the command line by walking back from the text of the first environment variable; once that
    variable has been set again (os.environ[...] = ..., which moves it to the heap) the walk fails, and no
    title is ever shown. Call it before the first change to os.environ."""
    try:
        getproctitle()  # sets setproctitle up, as its first call of any kind does
    except Exception:
        pass


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


def child_pids(pid: int | None = None) -> list[int]:
    """The pids of the direct children of `pid` (this process by default); [] when it has none or is gone.
    Reads /proc/<pid>/task/*/children (cheap: no scan of every process), else asks psutil."""
    pid = os.getpid() if pid is None else pid
    try:
        found: list[int] = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(word) for word in f.read().split())
        return found
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return []
    except (OSError, ValueError):
        pass
    try:
        import psutil
        return [child.pid for child in psutil.Process(pid).children()]
    except Exception:
        return []


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant of it, parents before their children."""
    tree, index = [pid], 0
    while index < len(tree) and len(tree) < 100_000:
        tree.extend(child for child in child_pids(tree[index]) if child not in tree)
        index += 1
    return tree


def describe_pid(pid: int) -> str:
    """A short description of a process for the log: its pid and command line, escaped."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read(300).replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        command = ""
    return f"pid {pid}" + (f" ({escape_control(command)[:200]})" if command else "")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and all its descendants (listed first: a killed parent's children would move away)."""
    tree = process_tree(pid)
    for member in reversed(tree):
        try:
            os.kill(member, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return tree


def _has_children() -> bool:
    """Whether this process has a child, running or finished (a finished one is reaped on the way)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True  # one still runs
        # a finished child, reaped now: look again for others


def end_descendants(keep: Iterable[int] = (), timeout: float = 5.0) -> list[str]:
    """SIGKILL every descendant of this process but `keep` and reap them; returns what was ended, for
    the log. Meant for a child subreaper (become_subreaper): orphaned grandchildren (a double fork, a
    setsid daemon) become its direct children, so they are found and reaped here too."""
    import time
    if not keep and not _has_children():
        return []  # one system call: the usual case after a task, which started no process
    keep = set(keep)
    ended: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        direct = [pid for pid in child_pids() if pid not in keep]
        if not direct:
            break
        for pid in direct:
            if not _is_zombie(pid):  # a finished process nobody waited for is only reaped
                ended.append(describe_pid(pid))
            kill_tree(pid)
        for pid in direct:  # SIGKILLed: each is gone at once, unless stuck in the kernel
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.005)
    return ended


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
