"""The master's pidfile: refuses a second master, survives a crash of the first.

It is held only by a live master of the same program: a pidfile naming a process that is not one (a pid
reused after a crash or a reboot) is stale and replaced, with a warning saying what the pid names now.

The file is always complete when it appears (written to a temporary file in the same directory, then
linked or renamed into place), so a reader never sees a half-written pid.
"""

from __future__ import annotations

import logging
import os
import tempfile

import psutil

log = logging.getLogger("supervisor")


class PidfileHeld(Exception):
    """The pidfile names a process that is still alive: another master is probably running."""

    def __init__(self, path: str, pid: int) -> None:
        super().__init__(f"pidfile {path} is held by running process {pid}")
        self.path = path
        self.pid = pid


# psutil derives a start time from the boot time, which /proc gives in whole seconds.
START_TIME_SLACK = 1.0


def master_holding(pid: int, proc_name: str, written: float | None) -> str | None:
    """Whether live process `pid` may be the master that wrote a pidfile at time `written` (its mtime):
    None if it may (the file is held), else why it is not (the file is stale: a pid reused after a crash
    or a reboot). A master of `proc_name` has the title "<proc_name>: master ..." (set before it writes
    its pidfile) or, in its first instants, a command line naming <proc_name> or carrot.cli; it cannot
    have started after the file was written. A process this user may not inspect is taken as a master:
    refusing to start is the safe mistake."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            started = process.create_time()
            argv = process.cmdline()
            if process.status() == psutil.STATUS_ZOMBIE:
                return f"process {pid} has exited"
    except psutil.NoSuchProcess:
        return f"process {pid} is not running"
    except psutil.AccessDenied:
        return None
    command = " ".join(argv)
    shown = repr(command[:80] or f"pid {pid}")
    if written is not None and started > written + START_TIME_SLACK:
        return f"process {pid} started after the pidfile was written, so it did not write it (it is {shown})"
    if command.startswith(f"{proc_name}: "):
        if command.startswith(f"{proc_name}: master"):
            return None
        return f"process {pid} is not a {proc_name} master but one of its children ({shown})"
    if any(os.path.basename(arg) == proc_name or arg == "carrot.cli" for arg in argv[:3]):
        return None  # a master that has not set its title yet
    return f"process {pid} is not a {proc_name} master (it is {shown})"


class Pidfile:
    def __init__(self, path: str, logger: logging.Logger | None = None, proc_name: str = "carrot-supervisor",
                 holder_check=master_holding) -> None:
        self.path = os.path.abspath(path)
        self.log = logger or log
        self.pid: int | None = None
        self.proc_name = proc_name
        self.holder_check = holder_check  # (pid, proc_name, written) -> None if held, else why it is stale

    @classmethod
    def take(cls, path: str, logger: logging.Logger, proc_name: str = "carrot-supervisor") -> "Pidfile | None":
        """The acquired pidfile, or None after logging why it cannot be had (nothing should start)."""
        pidfile = cls(path, logger=logger, proc_name=proc_name)
        try:
            pidfile.acquire()
        except PidfileHeld as exc:
            logger.error("%s; not starting", exc)
            return None
        except OSError as exc:
            logger.error("cannot write pidfile %s: %s; not starting", path, exc)
            return None
        return pidfile

    def read(self) -> int | None:
        """The pid in the file, or None if there is no file or it holds no usable pid."""
        try:
            with open(self.path) as f:
                text = f.read(64)
        except FileNotFoundError:
            return None
        try:
            pid = int(text.strip())
        except ValueError:
            return None
        return pid if pid > 0 else None

    def acquire(self) -> None:
        """Write our pid, unless a live process other than us holds the file (PidfileHeld)."""
        me = os.getpid()
        tmp = self._write_temporary(me)
        try:
            try:
                # link() fails if the file exists, so of two masters starting at once only one wins.
                os.link(tmp, self.path)
            except FileExistsError:
                self._replace_if_stale(tmp, me)
            except OSError:
                # A filesystem without hard links: fall back to check-then-rename.
                self._replace_if_stale(tmp, me)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self.pid = me

    def release(self) -> None:
        """Remove the file if it still holds our pid; a newer master's file is left alone."""
        if self.pid is None:
            return
        if self.read() == self.pid:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.pid = None

    def _replace_if_stale(self, tmp: str, me: int) -> None:
        holder = self.read()
        why_stale = None
        if holder is not None and holder != me:
            try:
                written = os.stat(self.path).st_mtime
            except FileNotFoundError:
                written = None
            why_stale = self.holder_check(holder, self.proc_name, written)
            if why_stale is None:
                raise PidfileHeld(self.path, holder)
        if os.path.exists(self.path):
            if holder is None:
                reason = "no pid in it"
            elif holder == me:
                reason = "it names this very process, left over from an earlier run"
            else:
                reason = why_stale
            self.log.warning("replacing stale pidfile %s (%s)", self.path, reason)
        os.replace(tmp, self.path)
        # Two masters that both found the same stale file both renamed; the last one won.
        holder = self.read()
        if holder != me:
            raise PidfileHeld(self.path, holder or 0)

    def _write_temporary(self, pid: int) -> str:
        directory, name = os.path.split(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp
