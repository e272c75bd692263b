"""What makes a ScheduledTask row runnable, checked when a person saves one (admin, monitor form).

`ScheduledTask.clean()` calls `schedule_errors()`; every problem is reported against its field, so the
admin and the monitor show them inline. Arguments are parsed as JSON only (never eval'd).
"""
from __future__ import annotations

import json

from carrot.messages import nesting_depth

MAX_ARGUMENT_TEXT = 64 * 1024         # characters of JSON per arguments field
MAX_ARGUMENT_DEPTH = 32               # nesting of lists/dicts in the arguments


def _kind_name(kind: type) -> str:
    return 'list' if kind is list else 'object'


def parse_json_argument(text: str | None, kind: type, example: str):
    """The JSON value of an arguments field (empty means none), or ValueError saying what is wrong."""
    text = (text or '').strip()
    if not text:
        return kind()
    if len(text) > MAX_ARGUMENT_TEXT:
        raise ValueError(f'is too long ({len(text)} characters, at most {MAX_ARGUMENT_TEXT})')
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f'nests too deeply (at most {MAX_ARGUMENT_DEPTH} levels)') from None
    except ValueError as exc:
        raise ValueError(f'is not valid JSON ({exc}); write a JSON {_kind_name(kind)}, e.g. {example}') from None
    if not isinstance(value, kind):
        raise ValueError(f'must be a JSON {_kind_name(kind)}, e.g. {example}')
    if nesting_depth(value, MAX_ARGUMENT_DEPTH) > MAX_ARGUMENT_DEPTH:
        raise ValueError(f'nests too deeply (at most {MAX_ARGUMENT_DEPTH} levels)')
    return value


def schedule_errors(schedule) -> dict[str, str]:
    """Field name -> what is wrong with it, for one ScheduledTask (empty when it can be saved)."""
    from carrot import registry
    from carrot.config import get_config
    from carrot.exceptions import CarrotConfigException, TaskNotRegistered

    errors = {}
    try:
        registry.get_task(schedule.task)
    except TaskNotRegistered as exc:
        errors['task'] = str(exc)

    try:
        parse_json_argument(schedule.task_args, list, '[1, "two"]')
    except ValueError as exc:
        errors['task_args'] = f'Positional arguments {exc}.'
    try:
        parse_json_argument(schedule.content, dict, '{"order_id": 42}')
    except ValueError as exc:
        errors['content'] = f'Keyword arguments {exc}.'

    multiplier = schedule.SECONDS_PER.get(schedule.interval_type)
    if multiplier is None:
        errors['interval_type'] = f'Choose one of {", ".join(schedule.SECONDS_PER)}.'
    elif not isinstance(schedule.interval_count, int) or schedule.interval_count < 1:
        errors['interval_count'] = 'Give a whole number of at least 1.'
    elif schedule.interval_count * multiplier > schedule.MAX_INTERVAL.total_seconds():
        most = int(schedule.MAX_INTERVAL.total_seconds()) // multiplier
        errors['interval_count'] = (f'At most {most} {schedule.interval_type} (a schedule runs at least '
                                    f'once every {schedule.MAX_INTERVAL.days} days).')

    if schedule.queue:
        try:
            get_config().queue(schedule.queue)
        except CarrotConfigException as exc:
            errors['queue'] = str(exc).capitalize()
    return errors
