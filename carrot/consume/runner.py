"""The one place that runs a task: call it, capture what it logs, and describe how it ended."""
from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Callable

from asgiref.sync import async_to_sync

TASK_LOGGER = 'carrot'
LOG_FORMAT = '%(asctime)s %(levelname)s %(message)s'


@dataclass
class TaskOutcome:
    succeeded: bool
    output: str | None = None
    exception: str = ''
    traceback: str = ''
    log: str = ''
    exception_class: str = ''              # the dotted path of the exception's class
    error: BaseException | None = None     # what the task raised; None when a retry cannot help


class _ThreadCapture(logging.Handler):
    """Collects the records emitted by one thread (other threads of the process log elsewhere), up to
    `limit` characters: a task that logs without end cannot fill the worker's memory.

    One per thread, made once and attached for each task (`_capture_for`): making a logging.Handler (its
    lock, its registration with the logging module, a Formatter) cost a twentieth of a worker's CPU in a
    drain of no-op tasks. It is detached between tasks, so nothing holds it once its thread is gone."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.thread_id = threading.get_ident()
        self.in_use = False
        self.start(None)
        self.setFormatter(_TASK_LINE)

    def start(self, limit: int | None) -> None:
        self.lines: list[str] = []
        self.size = 0
        self.dropped = 0
        self.limit = limit

    def emit(self, record):
        if record.thread != self.thread_id:
            return
        if self.limit is not None and self.size > self.limit:
            self.dropped += 1
            return
        try:
            line = self.format(record)
        except Exception as exc:  # noqa: BLE001 -- a task's bad log call must not fail the task
            line = _unformattable(record, exc)
        self.size += len(line) + 1
        self.lines.append(line)

    def text(self) -> str:
        captured = '\n'.join(self.lines)
        if self.dropped:
            captured += f'\n[... {self.dropped} more log records not kept]'
        return captured


_TASK_LINE = logging.Formatter(LOG_FORMAT)  # keeps no state between records: every capture shares it
_this_thread = threading.local()


def _capture_for(limit: int | None) -> _ThreadCapture:
    """This thread's capture, emptied for a task; a new one for a task run inside another's (its lines go
    to the inner task)."""
    capture = getattr(_this_thread, 'capture', None)
    if capture is None:
        capture = _this_thread.capture = _ThreadCapture()
    elif capture.in_use:
        capture = _ThreadCapture()
    capture.start(limit)
    capture.in_use = True
    return capture


def _unformattable(record: logging.LogRecord, exc: Exception) -> str:
    """The line kept for a record whose message cannot be formatted (arguments that do not fit its
    format, an argument whose __str__ raises): where it was logged and why it could not be shown."""
    return (f'{record.levelname} [a log record from {record.pathname}:{record.lineno} could not be formatted: '
            f'{type(exc).__name__}]')


def encode_output(value) -> str | None:
    """A task's return value for MessageLog.output: JSON when it can be, else its str(). NaN and the
    infinities are not JSON (a strict reader refuses them), so a value holding one is kept as its str()."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        return str(value)
    except BaseException:  # a __str__ that raises (or recurses) must not turn a success into a failure
        return f'<{type(value).__name__} object that cannot be shown>'


def run_task(func: Callable, args: list, kwargs: dict, log_limit: int | None = None) -> TaskOutcome:
    """Run ``func(*args, **kwargs)``; never raises for what the task does: any BaseException it raises
    (SystemExit, KeyboardInterrupt, GeneratorExit, a subclass of its own) is its failure, described by
    its own type and message -- it must not end the worker, whose next delivery would run it again.
    At most about `log_limit` characters of the task's log lines are kept."""
    logger = logging.getLogger(TASK_LOGGER)
    capture = _capture_for(log_limit)
    logger.addHandler(capture)
    pid = os.getpid()
    try:
        try:
            try:
                if inspect.iscoroutinefunction(func):  # an async def task runs to completion here
                    value = async_to_sync(func)(*args, **kwargs)
                else:
                    value = func(*args, **kwargs)
            finally:
                if os.getpid() != pid:
                    # A copy of the worker the task forked, returning (or raising) out of the task: it
                    # must not go on as a second worker, recording a result or taking messages.
                    os._exit(0)
        except TypeError as exc:
            # A TypeError raised by the call itself (wrong arguments) is the message's fault, not the
            # task's; say so. One raised inside the task keeps its own traceback below.
            outcome = _failure(exc)
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                outcome.exception = f'the message arguments do not fit the task: {exc}'
                outcome.error = None  # the message's fault: the same call fails the same way again
            return _with_log(outcome, capture)
        except BaseException as exc:  # noqa: B036 -- whatever the task raises is the task's failure
            return _with_log(_failure(exc), capture)
        return _with_log(TaskOutcome(succeeded=True, output=encode_output(value)), capture)
    finally:
        logger.removeHandler(capture)
        capture.in_use = False
        capture.start(None)  # what it kept goes with the outcome, not with the thread


def _failure(exc: BaseException) -> TaskOutcome:
    try:
        described = f'{type(exc).__name__}: {exc}'
    except BaseException:  # an exception whose __str__ raises (anything)
        described = f'{type(exc).__name__} (its message cannot be shown)'
    try:
        trace = ''.join(traceback.format_exception(exc))
    except BaseException:
        trace = ''
    return TaskOutcome(succeeded=False, exception=described, traceback=trace, error=exc,
                       exception_class=exception_class_path(exc))


def exception_class_path(exc: BaseException) -> str:
    kind = type(exc)
    return f'{kind.__module__}.{kind.__qualname__}'


def _with_log(outcome: TaskOutcome, capture: _ThreadCapture) -> TaskOutcome:
    outcome.log = capture.text()
    return outcome
