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
        logging.StreamHandler.emit(self, record)

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
