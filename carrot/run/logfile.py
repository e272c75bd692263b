"""The supervisor's log file (`--logfile`), opened so it cannot be turned against its owner.

The log holds task arguments, so a new file is created with mode 0640 (less if the umask says so), and
never through a symbolic link: whoever can write the log's directory must not be able to point the
master at another file (O_NOFOLLOW on the last path component; directories on the way may be links, as
/var/log often is). An existing file keeps its mode. The file is reopened when logrotate moves it
(checked before each line, as logging.handlers.WatchedFileHandler does) and on USR1, with the same rules.
"""
from __future__ import annotations

import errno
import logging.handlers
import os
import sys

LOG_FILE_MODE = 0o640


class LogFileError(Exception):
    """The log file cannot be opened safely (a symbolic link) or at all; the text says which file and why."""


def open_log_file(path: str, encoding: str | None = None, errors: str | None = None):
    """A text stream appending to `path`, created mode 0640, never through a symlink (LogFileError)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, LOG_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LogFileError(f'refusing to log to {path}: it is a symbolic link (give the path of the '
                               f'file itself)') from None
        raise LogFileError(f'cannot open the log file {path}: {exc.strerror}') from None
    return os.fdopen(fd, 'a', encoding=encoding or 'utf-8', errors=errors or 'backslashreplace')


class LogFileHandler(logging.handlers.WatchedFileHandler):
    """WatchedFileHandler that opens its file with `open_log_file`, and keeps the process running when
    it cannot (lines are dropped, and one line on stderr says why, until the file can be opened)."""

    def __init__(self, path: str):
        self.refusal: str | None = None
        self.write_failure: str | None = None  # why lines cannot be written now (a full disk), once said
        self.dropped = 0
        self._failed_now = False
        super().__init__(path, encoding='utf-8', errors='backslashreplace')

    def _open(self):
        return open_log_file(self.baseFilename, self.encoding, self.errors)

    def emit(self, record):
        try:
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
                self._statstream()
        except LogFileError as exc:
            self._refused(exc)
            return
        self.refusal = None
        self._failed_now = False
        logging.StreamHandler.emit(self, record)  # a write that fails comes back through handleError
        if not self._failed_now and self.write_failure is not None:
            print(f'carrot: writing to the log file {self.baseFilename} again ({self.dropped} line(s) were '
                  f'dropped)', file=sys.stderr, flush=True)
            self.write_failure = None
            self.dropped = 0

    def handleError(self, record):
        """A line that cannot be written (a full disk, a file size limit, an I/O error): dropped, with one
        line on stderr when writing starts failing (and one when it works again), not a traceback per
        line -- a flood journald would have to keep. Other errors (a bad format) are Python's usual report."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        self._failed_now = True
        self.dropped += 1
        if self.stream is not None:  # what the buffer holds could not be written: let it go, reopen next line
            try:
                self.stream.close()
            except Exception:
                pass
            self.stream = None
        why = f'cannot write to the log file {self.baseFilename}: {exc.strerror or exc}'
        if why != self.write_failure:
            self.write_failure = why
            print(f'carrot: log lines dropped: {why}', file=sys.stderr, flush=True)

    def reopen(self) -> None:
        """Close and open the file again (USR1)."""
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
                self.stream = None
            try:
                self.stream = self._open()
                self._statstream()
            except LogFileError as exc:
                self._refused(exc)
        finally:
            self.release()

    def _refused(self, exc: LogFileError) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if str(exc) != self.refusal:  # once per change, not once per line
            self.refusal = str(exc)
            print(f'carrot: log lines dropped: {exc}', file=sys.stderr, flush=True)
