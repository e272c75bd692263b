"""Bounding and escaping of text that came from a message, before it is stored, logged or shown.

Anyone who can write to a queue chooses these bytes, so nothing from a message reaches a database
column, a log line, a process title or a terminal as is:

- ``for_column(value, limit)``: fits a text column. Cut to `limit` characters with a visible marker, NUL
  (which PostgreSQL text cannot hold) and lone surrogates (which no UTF-8 database can hold) escaped.
- ``for_log(value, limit)``: one safe line. Control characters (newlines, ANSI escapes, NUL, bidi
  overrides ...) written as ``\\xNN``/``\\uNNNN`` escapes, cut with a marker.
- ``shown(value)``: any value (bytes, numbers, nested tables) as text for the two above.
- ``LogFormatter``: the formatter of carrot-supervisor's log, which escapes whatever a log call missed.
"""
from __future__ import annotations

import logging
import os
import time
import unicodedata

CUT_MARKER = ' [... cut: {} more characters]'
LOG_LIMIT = 300  # characters of message content in one log line


def cut(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its start and a marker saying how much is missing.
    The result is never longer than `limit` (a limit shorter than the marker gets a bare cut)."""
    if len(text) <= limit:
        return text
    # Room for the marker is measured with the longest count it can show, so the result always fits.
    keep = limit - len(CUT_MARKER.format(len(text)))
    if keep <= 0:
        return text[:limit]
    return text[:keep] + CUT_MARKER.format(len(text) - keep)


def shown(value) -> str:
    """A value from a message as text: str as is, bytes decoded (invalid UTF-8 escaped), else repr()."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode('utf-8', 'backslashreplace')
    try:
        return repr(value)
    except Exception:  # a hostile __repr__ cannot come over the wire, but be sure
        return f'<unprintable {type(value).__name__}>'


def storable(text: str) -> str:
    """`text` with what a database text column cannot hold escaped: NUL and lone surrogates."""
    if '\x00' in text:
        text = text.replace('\x00', '\\x00')
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        text = text.encode('utf-8', 'backslashreplace').decode('utf-8')
    return text


def for_column(value, limit: int | None) -> str | None:
    """`value` ready for a text column of `limit` characters (None: unbounded). None stays None."""
    if value is None:
        return None
    text = storable(shown(value))
    return text if limit is None else cut(text, limit)


def _is_control(char: str) -> bool:
    # Cc: C0/C1 controls (newline, ESC, NUL, DEL ...); Cf: invisible formatting such as bidi overrides;
    # Zl/Zp: line and paragraph separators, which some terminals and log viewers break lines on.
    return unicodedata.category(char) in ('Cc', 'Cf', 'Zl', 'Zp', 'Cs')


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape, so it stays on one line, inert."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if _is_control(char):
            code = ord(char)
            out.append(f'\\x{code:02x}' if code < 0x100 else f'\\u{code:04x}')
        else:
            out.append(char)
    return ''.join(out)


def for_log(value, limit: int = LOG_LIMIT) -> str:
    """`value` as one inert line for a log, a process title or a terminal."""
    return cut(escape_controls(shown(value)), limit)


class LogFormatter(logging.Formatter):
    """The last line of defence for the log file: whatever a log call passes on (a task path from a
    schedule row, an exception text quoting a message), its message cannot carry raw control characters,
    and a line break in it continues indented, so it can never pass for a log line of its own.
    Tracebacks are left as they are (Python writes them, not a message)."""

    _second: tuple[int, str] = (-1, '')  # the last second written, and its text (formatTime)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = '\n    '.join(escape_controls(line) for line in record.message.split('\n'))
        return super().formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As logging.Formatter writes it, the date and time text made once a second: a worker writes a
        line a task, and strftime() for each was a fiftieth of its CPU in a drain."""
        if datefmt is not None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, time.localtime(second)))
        return self.default_msec_format % (cached[1], record.msecs)


def new_message_id() -> str:
    """A message id: a UUID whose first 48 bits are the time in milliseconds (version 7, RFC 9562).

    Ids made one after the other sort together, so the log table's unique index on uuid grows at one end
    like its primary key: a random (version 4) id lands on a random page of that index, and with a million
    rows in the table each insert touched a page no other recent insert had (a full-page image in
    PostgreSQL's WAL after every checkpoint, and a read when it was not cached)."""
    millis = time.time_ns() // 1_000_000
    random_bits = int.from_bytes(os.urandom(10), 'big')  # 74 of them are kept
    value = (millis & (2**48 - 1)) << 80 | 0x7 << 76 | (random_bits >> 68 & 0xFFF) << 64 \
        | 0b10 << 62 | random_bits & (2**62 - 1)
    digits = f'{value:032x}'  # str(uuid.UUID(int=value)), without making the object
    return f'{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}'
