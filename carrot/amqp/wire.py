"""The wire format: the one place that turns a task call into an AMQP message and back.

Compatible with django-carrot 1.x, so queues holding old messages drain:

- properties: ``headers={'type': '<dotted.task.path>'}``, ``message_id=<MessageLog uuid>``,
  ``content_type='application/json'``, ``priority=<0..255>``, ``type='django-carrot message'``,
  ``delivery_mode=2`` (persistent; 1.x did not set it);
- body: JSON ``{"args": [...], "kwargs": {...}}``; 1.x left out either key when it was empty.

On the way in, `decode_delivery()` turns one delivery into an immutable `IncomingMessage`, once, and
never raises: whatever makes a message unusable (any bytes in any header, oversize, nesting, a body
that is not JSON) is a sentence in its `problem`, and the processor fails it with that reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from carrot import text
from carrot.exceptions import BadMessage, InvalidCall, NotSerialisable

TYPE_HEADER = 'type'
CONTENT_TYPE = 'application/json'
MESSAGE_TYPE = 'django-carrot message'
MAX_PRIORITY = 255
MAX_ID_LENGTH = 200       # MessageLog.uuid
MAX_TASK_LENGTH = 200     # MessageLog.task
MAX_NESTING = 100         # levels of lists/objects in a body; deeper is refused, not parsed further
WAITS_HEADER = 'x-carrot-waits'  # how often a delivery was parked because another worker ran it
# Set on a message sent from its row to a queue that tracks less ('track'): the consumer looks the row up
# even on a first delivery (carrot.consume.processor._untracked).
LOGGED_HEADER = 'x-carrot-logged'


@dataclass(frozen=True)
class TaskCall:
    """What a message asks for: run `task` with `args` and `kwargs`."""
    task: str
    args: list
    kwargs: dict


def check_serialisable(task: str, args: tuple, kwargs: dict) -> None:
    """Raise NotSerialisable (a TypeError) naming the first argument that JSON cannot carry."""
    for position, value in enumerate(args, start=1):
        _check_value(value, f'positional argument {position}', task)
    for key, value in kwargs.items():
        _check_value(value, f'keyword argument {key!r}', task)


def _check_value(value: Any, what: str, task: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise NotSerialisable(f'{what} of task {task} is not JSON-serialisable '
                        f'({type(value).__name__}: {exc}); pass ids and plain values instead') from None


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise InvalidCall(f'priority must be an integer from 0 to {MAX_PRIORITY}, got {priority!r}')
    return priority


def encode_body(args, kwargs) -> bytes:
    return json.dumps({'args': list(args), 'kwargs': dict(kwargs)}, allow_nan=False).encode()


def message_properties(task: str, message_id: str, priority: int) -> dict:
    """Keyword arguments for pika.BasicProperties (a dict, so this module needs no pika)."""
    return dict(headers={TYPE_HEADER: task}, message_id=message_id, content_type=CONTENT_TYPE,
                priority=priority, type=MESSAGE_TYPE, delivery_mode=2)


def with_logged_header(properties: dict) -> dict:
    """message_properties() of a message that has a row (LOGGED_HEADER set)."""
    return {**properties, 'headers': {**(properties.get('headers') or {}), LOGGED_HEADER: 1}}


def task_type(properties) -> str:
    """The task's dotted path from the message headers, or BadMessage saying what is wrong with it."""
    headers = getattr(properties, 'headers', None)
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise BadMessage(f'the message headers must be a table, got {type(headers).__name__}')
    value = headers.get(TYPE_HEADER)
    if value is None:
        names = ', '.join(text.for_log(name, 40) for name in sorted(map(text.shown, headers))[:20])
        raise BadMessage(f"the message has no '{TYPE_HEADER}' header naming its task, so carrot cannot "
                         f"tell what to run (headers: [{names}])")
    if isinstance(value, (bytes, bytearray)):
        raise BadMessage(f"the message's '{TYPE_HEADER}' header is not UTF-8 text: "
                         f"{text.for_log(value, 100)}")
    if not isinstance(value, str):
        raise BadMessage(f"the message's '{TYPE_HEADER}' header must be a dotted task path, got "
                         f"{type(value).__name__}: {text.for_log(value, 100)}")
    check_task_path(value)
    return value


def check_task_path(value: str) -> None:
    """BadMessage unless `value` reads as a dotted path of Python identifiers that fits its column."""
    if len(value) > MAX_TASK_LENGTH:
        raise BadMessage(f"the message's '{TYPE_HEADER}' header is {len(value)} characters long; a task "
                         f"path has at most {MAX_TASK_LENGTH}: {text.for_log(value, 100)}")
    parts = value.split('.')
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise BadMessage(f"the message's '{TYPE_HEADER}' header must be a dotted task path such as "
                         f"myapp.tasks.send_invoice, got {text.for_log(value, 100)!r}")


def decode_arguments(body: bytes) -> tuple[list, dict]:
    """(args, kwargs) from a message body, or BadMessage saying what is wrong with it."""
    try:
        body_text = bytes(body).decode('utf-8') if isinstance(body, (bytes, bytearray, memoryview)) else body
    except UnicodeDecodeError as exc:
        raise BadMessage(f'the message body is not UTF-8 text ({exc}): {_preview(body)}') from None
    if not isinstance(body_text, str):
        raise BadMessage(f'the message body must be JSON text, got {type(body).__name__}')
    try:
        content = json.loads(body_text) if body_text.strip() else {}
    except RecursionError:
        raise BadMessage(f'the message body is JSON nested too deeply to read (carrot reads at most '
                         f'{MAX_NESTING} levels): {_preview(body)}') from None
    except ValueError as exc:
        raise BadMessage(f'the message body is not JSON ({exc}): {_preview(body)}') from None
    if nesting_depth(content) > MAX_NESTING:
        raise BadMessage(f'the message body is JSON nested more than {MAX_NESTING} levels deep; carrot '
                         f'refuses it: {_preview(body)}')
    if not isinstance(content, dict):
        raise BadMessage(f'the message body must be a JSON object with "args" and "kwargs", got '
                         f'{type(content).__name__}: {_preview(body)}')
    args = content.get('args', [])
    kwargs = content.get('kwargs', {})
    if not isinstance(args, list):
        raise BadMessage(f'"args" in the message body must be a JSON list, got {type(args).__name__}: '
                         f'{text.for_log(args, 200)}')
    if not isinstance(kwargs, dict):
        raise BadMessage(f'"kwargs" in the message body must be a JSON object, got '
                         f'{type(kwargs).__name__}: {text.for_log(kwargs, 200)}')
    return args, kwargs


def nesting_depth(value, limit: int = MAX_NESTING) -> int:
    """How many lists/objects deep a decoded JSON value goes (without recursion, so any depth is safe);
    counting stops once it is past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def decode(properties, body: bytes) -> TaskCall:
    args, kwargs = decode_arguments(body)
    return TaskCall(task_type(properties), args, kwargs)


def _preview(body, limit=200) -> str:
    return text.for_log(body, limit)


class NestedTooDeep:
    """Stands in (in decoded AMQP headers) for a table or array nested deeper than carrot reads."""

    def __repr__(self):
        return '<nested too deeply; not read>'


def headers_too_deep(headers) -> bool:
    """Whether a NestedTooDeep marker is anywhere in `headers` (walked without recursion)."""
    stack = [headers]
    while stack:
        item = stack.pop()
        if isinstance(item, NestedTooDeep):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


# -- headers RabbitMQ itself reads when it dead-letters a message ------------------------------------

DEATH_HEADER = 'x-death'                    # RabbitMQ's record of earlier dead-letterings
SET_ASIDE_HEADER = 'x-carrot-unusable-x-death'  # where carrot moves an x-death that would crash RabbitMQ


def x_death_crashes_rabbitmq(headers) -> bool:
    """Whether dead-lettering a message with these headers would crash the queue inside RabbitMQ (seen with
    3.10): an `x-death` array holding anything but tables, or a table whose `count` is not an integer. A
    classic queue's process dies and the message is lost; a quorum queue's state machine stops."""
    value = headers.get(DEATH_HEADER) if isinstance(headers, dict) else None
    if isinstance(value, NestedTooDeep):
        return True  # not read, so not known to be harmless
    if not isinstance(value, (list, tuple)):
        return False  # absent, or not an array: RabbitMQ replaces it
    return not all(isinstance(entry, dict) and _an_integer(entry.get('count', 0)) for entry in value)


def _an_integer(value) -> bool:
    """An AMQP integer as pika decodes it: an int, or pika's long (an int subclass) for a 64-bit one, as
    RabbitMQ writes its counts; a bool is not one."""
    return isinstance(value, int) and not isinstance(value, bool)


def without_unusable_x_death(headers: dict) -> dict:
    """`headers` with an `x-death` that would crash RabbitMQ moved aside, as text (nothing is dropped)."""
    if not x_death_crashes_rabbitmq(headers):
        return headers
    kept = {key: value for key, value in headers.items() if key != DEATH_HEADER}
    kept[SET_ASIDE_HEADER] = text.for_log(headers[DEATH_HEADER], 2000)
    return kept


class DefaultMessageSerializer:
    """How a message names its task and carries its arguments (the 1.x extension point)."""
    type_header = TYPE_HEADER
    content_type = CONTENT_TYPE
    message_type = MESSAGE_TYPE

    def get_task_type(self, properties, body) -> str:
        return task_type(properties)

    def serialize_arguments(self, body) -> tuple[list, dict]:
        """(args, kwargs) from a body; the 1.x name, kept (it deserialises)."""
        return decode_arguments(body)

    def get_task(self, properties, body):
        from carrot.registry import get_task
        return get_task(self.get_task_type(properties, body))


# -- one delivery, decoded once ---------------------------------------------------------------------

@dataclass(frozen=True)
class IncomingMessage:
    """One delivery from a queue, decoded once. Decoding never raises: what makes a message unusable is
    in `problem`, a sentence for a person. Everything except `body` and `properties` is safe to store
    (bounded, escaped) -- `shown_task` also to log."""
    task: str                      # the dotted path, when the message names one properly; else ''
    shown_task: str                # for logs, titles and the task column: escaped, bounded
    message_id: str | None         # None when the message has none (it is adopted) or an unusable one
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    priority: int = 0
    redelivered: bool = False
    size: int = 0                  # bytes of the body
    exchange: str = ''
    routing_key: str = ''
    waits: int = 0                 # times carrot parked it because another worker was running it
    problem: str | None = None     # why it cannot be run (it is FAILED and dead-lettered), None if fine
    body: bytes = b''
    properties: Any = None         # the pika properties, as received (for republishing)

    @property
    def is_bad(self) -> bool:
        return self.problem is not None

    @property
    def stored_arguments(self) -> tuple[str, str]:
        """(task_args, content) for the log row: the JSON arguments, or a preview of a broken body."""
        if self.problem is None:
            return json.dumps(list(self.args)), json.dumps(self.kwargs)
        return '', text.for_column(_preview(self.body, 2000), 10000)


def decode_delivery(method, properties, body, max_size: int,
                    get_task_type: Callable = None, get_arguments: Callable = None) -> IncomingMessage:
    """Turn one AMQP delivery into an IncomingMessage. `get_task_type(properties, body)` and
    `get_arguments(body)` are the consumer's (1.x extension points); whatever they raise is a problem."""
    get_task_type = get_task_type or (lambda props, _: task_type(props))
    get_arguments = get_arguments or decode_arguments
    body = bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else text.shown(body).encode()
    common = dict(size=len(body), body=body, properties=properties,
                  redelivered=bool(getattr(method, 'redelivered', False)),
                  exchange=text.for_column(getattr(method, 'exchange', '') or '', 200),
                  routing_key=text.for_column(getattr(method, 'routing_key', '') or '', 200),
                  priority=_priority(properties), waits=_waits(properties))
    raw_task = (getattr(properties, 'headers', None) or {}).get(TYPE_HEADER) \
        if isinstance(getattr(properties, 'headers', None), dict) else None
    shown_task = text.for_column(text.for_log(raw_task, MAX_TASK_LENGTH), MAX_TASK_LENGTH) \
        if raw_task is not None else '(no task type header)'
    message_id, id_problem = _message_id(properties)

    def bad(problem):
        return IncomingMessage(task='', shown_task=shown_task, message_id=message_id, problem=problem,
                               **common)

    if len(body) > max_size:  # not even parsed
        return bad(f"the message body is {len(body)} bytes, more than CARROT['max_message_size'] "
                   f"({max_size} bytes); carrot did not read it")
    if id_problem:
        return bad(id_problem)
    if headers_too_deep(getattr(properties, 'headers', None)):
        return bad('the message headers hold tables nested too deeply for carrot to read them')
    try:
        task = get_task_type(properties, body)
        if not isinstance(task, str):
            raise BadMessage(f'the task type must be a dotted path, got {type(task).__name__}')
        check_task_path(task)
        args, kwargs = get_arguments(body)
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise BadMessage('the message arguments must be a list and a dict')
    except BadMessage as exc:
        return bad(str(exc))
    except Exception as exc:  # a broken serializer or subclass hook: the message still ends FAILED
        return bad(f'the message could not be decoded ({type(exc).__name__}: {text.for_log(exc, 200)})')
    return IncomingMessage(task=task, shown_task=task, message_id=message_id, args=tuple(args),
                           kwargs=dict(kwargs), **common)


def _message_id(properties) -> tuple[str | None, str | None]:
    """(message_id, problem). A missing id is not a problem (the message is adopted); a broken one is."""
    value = getattr(properties, 'message_id', None)
    if value is None or value == '':
        return None, None
    if not isinstance(value, str):
        return None, f'the message_id property is not UTF-8 text: {text.for_log(value, 100)}'
    if len(value) > MAX_ID_LENGTH or not value.isprintable() or value != value.strip():
        return None, (f'the message_id property is not a usable id (at most {MAX_ID_LENGTH} printable '
                      f'characters, no surrounding spaces): {text.for_log(value, 100)!r}')
    return value, None


def _priority(properties) -> int:
    value = getattr(properties, 'priority', None)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255 else 0


def _waits(properties) -> int:
    headers = getattr(properties, 'headers', None)
    value = headers.get(WAITS_HEADER) if isinstance(headers, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1000 else 0
