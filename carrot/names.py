"""Names AMQP carries and the log table stores: a queue, an exchange, a routing key, a message id.

AMQP carries them as short strings (at most 255 bytes) and MessageLog's columns hold 200 characters; a
name past either is refused where it is given (CARROT, a publish), not by the AMQP client halfway through
a send, nor by the relay later, every tick. A queue name leaves room for the suffix of its dead-letter
queue, which RabbitMQ must take too.
"""
from __future__ import annotations

from typing import Any

from carrot import text
from carrot.exceptions import InvalidCall

MAX_NAME_LENGTH = 200     # MessageLog.queue, .exchange, .routing_key and .uuid
MAX_SHORT_STRING = 255    # bytes in UTF-8: AMQP's short string
DEAD_LETTER_SUFFIX = '.dead'  # <queue>.dead holds what failed for good (carrot.amqp.declare)
MAX_QUEUE_NAME_BYTES = MAX_SHORT_STRING - len(DEAD_LETTER_SUFFIX)


def check_name(what: str, value: Any, max_bytes: int = MAX_SHORT_STRING) -> str:
    """`value` if its log column holds it and AMQP carries it (in `max_bytes`); InvalidCall naming `what`
    if not."""
    if not isinstance(value, str):
        raise InvalidCall(f'{what} must be a string, got {type(value).__name__}: {text.for_log(value, 100)}')
    try:
        size = len(value.encode('utf-8'))
    except UnicodeEncodeError:
        size = None
    if size is None or '\x00' in value:
        raise InvalidCall(f'{what} must be text a database can store (no NUL, no lone surrogate): '
                          f'{text.for_log(value, 100)}')
    if len(value) > MAX_NAME_LENGTH or size > max_bytes:
        raise InvalidCall(f'{what} is too long: at most {MAX_NAME_LENGTH} characters and {max_bytes} bytes '
                          f'in UTF-8, got {len(value)} characters: {text.for_log(value, 100)}')
    return value
