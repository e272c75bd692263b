"""What the supervisor's processes say to each other: the master <-> image messages and the child's reports.

Master and image talk over a SOCK_SEQPACKET socket pair: one JSON object per packet, so a message never
arrives in pieces. Master to image::

    Spawn        {"spawn": <request id>, "slot": "consumer default#2", "group": "consumer default",
                  "index": 2, "beat_interval": 1.0}      + the write end of the child's heartbeat pipe,
                                                           passed beside it (socket.send_fds)

Image to master::

    Ready        {"ready": <the plan's shape: Plan.shape()>, "options": {...}}   once built
    Failed       {"failed": "<why, one line>", "exit_code": 3}                   the build failed; it exits
    Spawned      {"spawned": <request id>, "pid": 4301}
    SpawnFailed  {"spawn_failed": <request id>, "error": "..."}

    Eof          no packet: the other side closed the channel. To the master: the image is gone. To
                 the image: the master is gone or has retired it, and it exits.

A child tells the master it is alive over its heartbeat pipe (child -> master), one line per record:
an empty line is a plain heartbeat (`BEAT`); a JSON object is a state report (`Report`).

Neither reader trusts what it reads: `decode()` turns anything that is not a well-formed message into
None, and the reader skips it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .exitcodes import EXIT_CONFIG

MAX_PACKET = 1 << 16
# One state report must fit one atomic pipe write (PIPE_BUF), so the master never reads half of one.
MAX_REPORT = 3000
BEAT = b"\n"


def _int(value: object) -> int:
    """`value` if it is an int proper (JSON true is no request id)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"not an integer: {value!r}")
    return value


def _dumps(message: dict) -> bytes:
    return json.dumps(message).encode()


# -- master -> image -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    """Fork a child for `slot`; the heartbeat pipe's write end travels beside the message."""
    request: int
    slot: str
    group: str
    index: int
    beat_interval: float

    def encode(self) -> bytes:
        return _dumps({"spawn": self.request, "slot": self.slot, "group": self.group, "index": self.index,
                       "beat_interval": self.beat_interval})

    @classmethod
    def from_dict(cls, message: dict) -> Spawn:
        interval = message["beat_interval"]
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"beat_interval is no number: {interval!r}")
        return cls(_int(message["spawn"]), str(message["slot"]), str(message["group"]), _int(message["index"]),
                   float(interval))


# -- image -> master -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    """The image is built; `groups` is its plan's shape (Plan.shape()), `options` the master's options
    it read (names from Arbiter.OPTIONS). The master checks the shape when it takes the plan: a shape it
    cannot use fails the image."""
    groups: tuple
    options: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        return _dumps({"ready": list(self.groups), "options": self.options})

    @classmethod
    def from_dict(cls, message: dict) -> Ready:
        groups, options = message["ready"], message.get("options") or {}
        if not isinstance(groups, list) or not isinstance(options, dict):
            raise TypeError("a plan shape is a list, options a dict")
        return cls(tuple(groups), options)


@dataclass(frozen=True)
class Failed:
    """The image's build failed; `exit_code` is what that means for a master with nothing running."""
    error: str
    exit_code: int = EXIT_CONFIG

    def encode(self) -> bytes:
        return _dumps({"failed": self.error, "exit_code": self.exit_code})

    @classmethod
    def from_dict(cls, message: dict) -> Failed:
        return cls(str(message["failed"]), int(message.get("exit_code") or EXIT_CONFIG))


@dataclass(frozen=True)
class Spawned:
    request: int
    pid: int

    def encode(self) -> bytes:
        return _dumps({"spawned": self.request, "pid": self.pid})

    @classmethod
    def from_dict(cls, message: dict) -> Spawned:
        return cls(_int(message["spawned"]), _int(message["pid"]))


@dataclass(frozen=True)
class SpawnFailed:
    request: int
    error: str

    def encode(self) -> bytes:
        return _dumps({"spawn_failed": self.request, "error": self.error})

    @classmethod
    def from_dict(cls, message: dict) -> SpawnFailed:
        return cls(_int(message["spawn_failed"]), str(message.get("error")))


@dataclass(frozen=True)
class Eof:
    """The channel is closed (an empty read). Never sent: closing the socket says it."""


Message = Spawn | Ready | Failed | Spawned | SpawnFailed | Eof

# A message is a JSON object named by the one key of these that it has.
_BY_KEY = {"spawn": Spawn, "ready": Ready, "failed": Failed, "spawned": Spawned, "spawn_failed": SpawnFailed}


def decode(data: bytes) -> Message | None:
    """The message in one packet; Eof for an empty read; None for anything else (the reader skips it)."""
    if not data:
        return Eof()
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return None
    if not isinstance(message, dict):
        return None
    for key, kind in _BY_KEY.items():
        if key in message:
            try:
                return kind.from_dict(message)
            except (KeyError, TypeError, ValueError, OverflowError):
                return None
    return None


# -- child -> master: the heartbeat pipe -----------------------------------------------------------

@dataclass(frozen=True)
class Report:
    """What a child does now: `state` ("idle", "running"), the task in hand, its id and age (seconds)."""
    state: str | None
    task: str | None = None
    task_id: str | None = None
    age: float | None = None

    def encode(self) -> bytes:
        """One line for the heartbeat pipe (cut at MAX_REPORT: a longer report is lost, not split)."""
        record = {"state": self.state, "task": self.task, "task_id": self.task_id, "age": self.age}
        return json.dumps(record).encode("utf-8", "replace")[:MAX_REPORT] + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Report | None:
        """The report on one line (without its newline); None for a beat or anything unreadable."""
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not isinstance(record, dict):
            return None
        age = record.get("age")
        if isinstance(age, bool) or not isinstance(age, (int, float)):
            age = None
        return cls(_text(record.get("state")), _text(record.get("task")), _text(record.get("task_id")), age)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def read_reports(buffer: bytes, data: bytes) -> tuple[list[Report], bytes]:
    """The reports in `data`, read from a heartbeat pipe after `buffer` (the unfinished line of the
    last read), and the new unfinished line. Beats and unreadable lines count for nothing here."""
    *lines, rest = (buffer + data).split(b"\n")
    reports = []
    for line in lines:
        report = Report.decode(line) if line else None
        if report is not None:
            reports.append(report)
    # A line that never ends is no report (they fit MAX_REPORT): keep its tail only, not all of it.
    return reports, rest[-4096:]
