"""The wire format: the one place that turns a task call into an AMQP message and back.

Compatible with django-carrot 1.x, so queues holding old messages drain:

- properties: ``headers={'type': '<dotted.task.path>'}``, ``message_id=<MessageLog uuid>``,
  ``content_type='application/json'``, ``priority=<0..255>``, ``type='django-carrot message'``,
  ``delivery_mode=2`` (persistent; 1.x did not set it);
- body: JSON ``{"args": [...], "kwargs": {...}}``; 1.x left out either key when it was empty.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from carrot.exceptions import BadMessage

TYPE_HEADER = 'type'
CONTENT_TYPE = 'application/json'
MESSAGE_TYPE = 'django-carrot message'
MAX_PRIORITY = 255


@dataclass(frozen=True)
class TaskCall:
    """What a message asks for: run `task` with `args` and `kwargs`."""
    task: str
    args: list
    kwargs: dict


def check_serialisable(task: str, args: tuple, kwargs: dict) -> None:
    """Raise TypeError naming the first argument that JSON cannot carry."""
    for position, value in enumerate(args, start=1):
        _check_value(value, f'positional argument {position}', task)
    for key, value in kwargs.items():
        _check_value(value, f'keyword argument {key!r}', task)


def _check_value(value: Any, what: str, task: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f'{what} of task {task} is not JSON-serialisable '
                        f'({type(value).__name__}: {exc}); pass ids and plain values instead') from None


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f'priority must be an integer from 0 to {MAX_PRIORITY}, got {priority!r}')
    return priority


def encode_body(args, kwargs) -> bytes:
    return json.dumps({'args': list(args), 'kwargs': dict(kwargs)}, allow_nan=False).encode()


def message_properties(task: str, message_id: str, priority: int) -> dict:
    """Keyword arguments for pika.BasicProperties (a dict, so this module needs no pika)."""
    return dict(headers={TYPE_HEADER: task}, message_id=message_id, content_type=CONTENT_TYPE,
                priority=priority, type=MESSAGE_TYPE, delivery_mode=2)


def task_type(properties) -> str:
    """The task's dotted path from the message headers."""
    headers = getattr(properties, 'headers', None) or {}
    value = headers.get(TYPE_HEADER)
    if value is None:
        raise BadMessage(f"the message has no '{TYPE_HEADER}' header naming its task, so carrot cannot "
                         f"tell what to run (headers: {sorted(headers)})")
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'replace')
    if not isinstance(value, str) or not value:
        raise BadMessage(f"the message's '{TYPE_HEADER}' header must be a dotted task path, got {value!r}")
    return value


def decode_arguments(body: bytes) -> tuple[list, dict]:
    """(args, kwargs) from a message body, or BadMessage saying what is wrong with it."""
    try:
        text = body.decode('utf-8') if isinstance(body, (bytes, bytearray)) else body
        content = json.loads(text) if text.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadMessage(f'the message body is not JSON ({exc}): {_preview(body)}') from None
    if not isinstance(content, dict):
        raise BadMessage(f'the message body must be a JSON object with "args" and "kwargs", got '
                         f'{type(content).__name__}: {_preview(body)}')
    args = content.get('args', [])
    kwargs = content.get('kwargs', {})
    if not isinstance(args, list):
        raise BadMessage(f'"args" in the message body must be a JSON list, got {type(args).__name__}: '
                         f'{args!r:.200}')
    if not isinstance(kwargs, dict):
        raise BadMessage(f'"kwargs" in the message body must be a JSON object, got '
                         f'{type(kwargs).__name__}: {kwargs!r:.200}')
    return args, kwargs


def decode(properties, body: bytes) -> TaskCall:
    args, kwargs = decode_arguments(body)
    return TaskCall(task_type(properties), args, kwargs)


def _preview(body, limit=200) -> str:
    text = repr(body)
    return text if len(text) <= limit else text[:limit] + '...'
