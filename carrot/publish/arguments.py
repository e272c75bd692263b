"""How a task call's arguments are kept in the database: the one owner of that format.

Written (`dump`): positional arguments as a JSON list (the `task_args` column), keyword arguments as a
JSON object (`content`), in MessageLog and ScheduledTask rows alike.

Read back, also what django-carrot 1.x wrote:

- `load_logged` (MessageLog rows): JSON, or 1.x's Python tuple repr ``(1, 'a')`` for positional ones;
- `load_scheduled` (ScheduledTask rows): JSON, or 1.x's ``a, b, c`` text for positional ones (each a
  string). Held to MAX_TEXT characters and MAX_DEPTH levels of nesting per field, as the scheduler, the
  admin, the monitor and `create_scheduled_task` all check the same way.

Nothing is ever eval'd: the 1.x tuple is read with `ast.literal_eval`. A problem raises
`InvalidArguments` naming the field ('task_args' or 'content') with a sentence for a person.
"""
from __future__ import annotations

import ast
import json
import math

from carrot.amqp.wire import nesting_depth
from carrot.exceptions import InvalidArguments

MAX_TEXT = 64 * 1024   # characters of a schedule's arguments field
MAX_DEPTH = 32         # levels of lists/objects in a schedule's arguments

POSITIONAL, KEYWORD = 'task_args', 'content'
_WHAT = {POSITIONAL: 'positional arguments', KEYWORD: 'keyword arguments'}
_EXAMPLE = {POSITIONAL: '[1, "two"]', KEYWORD: '{"order_id": 42}'}


def dump(args, kwargs) -> tuple[str, str]:
    """(task_args, content) for a row."""
    return json.dumps(list(args)), json.dumps(dict(kwargs))


def load_logged(task_args: str | None, content: str | None) -> tuple[tuple, dict]:
    """A MessageLog row's (args, kwargs); InvalidArguments when they cannot be read back."""
    args = _load(task_args, POSITIONAL, legacy_tuple=True) if task_args else []
    kwargs = _load(content, KEYWORD, legacy_tuple=True) if content else {}
    return tuple(args), kwargs


def load_logged_leniently(task_args: str | None, content: str | None) -> tuple[tuple, dict]:
    """The same, for display: whatever cannot be read counts as no arguments."""
    try:
        args = load_logged(task_args, None)[0]
    except InvalidArguments:
        args = ()
    try:
        kwargs = load_logged(None, content)[1]
    except InvalidArguments:
        kwargs = {}
    return args, kwargs


def load_scheduled(task_args: str | None, content: str | None) -> tuple[tuple, dict]:
    """A ScheduledTask row's (args, kwargs), held to the size and depth limits; InvalidArguments naming
    the first field that is wrong (`scheduled_problems` gives every one)."""
    problems = scheduled_problems(task_args, content)
    if problems:
        field, message = next(iter(problems.items()))
        raise InvalidArguments(message, field)
    return _scheduled_args(task_args), _load(content, KEYWORD) if (content or '').strip() else {}


def scheduled_problems(task_args: str | None, content: str | None) -> dict[str, str]:
    """Field -> what is wrong with it ('the positional arguments are not valid JSON (...)'), for
    every field of a schedule's arguments that is wrong; empty when both can be read."""
    problems = {}
    for field, value in ((POSITIONAL, task_args), (KEYWORD, content)):
        try:
            _check_scheduled_field(value, field)
        except InvalidArguments as exc:
            problems[field] = str(exc)
    return problems


def is_legacy_schedule_text(task_args: str | None) -> bool:
    """Whether a schedule's positional arguments are 1.x's "a, b, c" text rather than JSON (text that
    starts like JSON or a Python tuple is read as JSON, and refused if it is not)."""
    text = (task_args or '').strip()
    return bool(text) and text[0] not in '[{("'


def as_json_text(args: tuple) -> str:
    """Positional arguments as the JSON a form shows (1.x "a, b" rows are shown as ["a", "b"])."""
    return json.dumps(list(args))


def _check_scheduled_field(value: str | None, field: str) -> None:
    text = (value or '').strip()
    if not text:
        return
    if len(text) > MAX_TEXT:
        raise InvalidArguments(f'the {_WHAT[field]} are too long ({len(text)} characters, at most '
                               f'{MAX_TEXT})', field)
    if field == POSITIONAL and is_legacy_schedule_text(text):
        return  # 1.x "a, b, c": plain strings, nothing nests
    loaded = _load(text, field)
    if nesting_depth(loaded, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidArguments(f'the {_WHAT[field]} are nested too deeply (at most {MAX_DEPTH} levels)', field)


def _scheduled_args(task_args: str | None) -> tuple:
    text = (task_args or '').strip()
    if not text:
        return ()
    if is_legacy_schedule_text(text):
        return tuple(part.strip() for part in text.split(',') if part.strip())
    return tuple(_load(text, POSITIONAL))


def strict_json(text: str):
    """`text` read as JSON that any strict reader takes too: ValueError for NaN, Infinity and a number past
    a float's range (1e999), which Python's json reads (the last as inf) and writes back as non-JSON."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_number)


def _no_constant(name: str):
    raise ValueError(f'{name} is not a JSON number')


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f'{text} is too large for a JSON number')
    return value


def _load(text: str, field: str, legacy_tuple: bool = False):
    """The JSON value of one field. `legacy_tuple`: a MessageLog row's, which may be 1.x's tuple repr (and
    whose problems are worded as about stored data); else a schedule's, worded for whoever writes it."""
    kind = list if field == POSITIONAL else dict
    what = f'stored {_WHAT[field]}' if legacy_tuple else _WHAT[field]
    try:
        # A schedule's arguments are sent as JSON, which has no NaN, no infinity and no number past a
        # float's range (1e999): refused here, with the rest that is not JSON, not at every run.
        value = json.loads(text) if legacy_tuple else strict_json(text)
    except RecursionError:
        raise InvalidArguments(f'the {what} are nested too deeply (at most {MAX_DEPTH} levels)', field) from None
    except ValueError as exc:
        if not legacy_tuple:
            raise InvalidArguments(f'the {what} are not valid JSON ({exc}); write a JSON '
                                   f'{"list" if kind is list else "object"}, e.g. {_EXAMPLE[field]}',
                                   field) from None
        try:  # django-carrot 1.x stored positional arguments as a Python tuple's repr
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError):
            raise InvalidArguments(f'the {what} are neither JSON nor a 1.x tuple', field) from None
        if isinstance(value, tuple):
            value = list(value)
    if not isinstance(value, kind):
        if legacy_tuple:
            raise InvalidArguments(f'the {what} are a {type(value).__name__}, not a {kind.__name__}', field)
        raise InvalidArguments(f'the {what} must be a JSON {"list" if kind is list else "object"}, e.g. '
                               f'{_EXAMPLE[field]}, got {type(value).__name__}', field)
    return value
