"""A task's captured log (carrot/consume/runner.py's LOG_FORMAT lines) as entries with a level, for the
detail page's level drop-down. Lines that do not start a record (a multi-line message, a traceback in
the log) belong to the entry above them."""
from __future__ import annotations

import re
from dataclasses import dataclass

LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')
LEVEL_NUMBERS = {name: (index + 1) * 10 for index, name in enumerate(LEVELS)}
DEFAULT_LEVEL = 'INFO'

_RECORD = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)?) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ')


@dataclass
class LogEntry:
    time: str
    level: str
    message: str

    @property
    def number(self) -> int:
        return LEVEL_NUMBERS.get(self.level, 20)

    def as_dict(self) -> dict:
        return {'time': self.time, 'level': self.level, 'message': self.message}


def parse_log(text: str | None) -> list[LogEntry]:
    entries: list[LogEntry] = []
    for line in (text or '').splitlines():
        match = _RECORD.match(line)
        if match:
            entries.append(LogEntry(match.group(1), match.group(2), line[match.end():]))
        elif entries:
            entries[-1].message += '\n' + line
        else:
            entries.append(LogEntry('', 'INFO', line))
    return entries


def level_named(name: str | None) -> str:
    name = (name or DEFAULT_LEVEL).upper()
    return name if name in LEVEL_NUMBERS else DEFAULT_LEVEL


def at_or_above(entries: list[LogEntry], level: str) -> list[LogEntry]:
    floor = LEVEL_NUMBERS[level_named(level)]
    return [entry for entry in entries if entry.number >= floor]
