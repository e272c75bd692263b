"""The master's pidfile: refuses a second master, survives a crash of the first.

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


class Pidfile:
    def __init__(self, path: str, logger: logging.Logger | None = None) -> None:
        self.path = os.path.abspath(path)
        self.log = logger or log
        self.pid: int | None = None

    @classmethod
    def take(cls, path: str, logger: logging.Logger) -> "Pidfile | None":
        """The acquired pidfile, or None after logging why it cannot be had (nothing should start)."""
        pidfile = cls(path, logger=logger)
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
        if holder is not None and holder != me and psutil.pid_exists(holder):
            raise PidfileHeld(self.path, holder)
        if os.path.exists(self.path):
            if holder is None:
                reason = "no pid in it"
            elif holder == me:
                reason = "it names this very process, left over from an earlier run"
            else:
                reason = f"process {holder} is not running"
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
