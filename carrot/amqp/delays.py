"""Delayed delivery on a stock RabbitMQ: binary delay levels (no plugin, no polling, nothing held unacked).

A virtual host gets LEVELS level queues, ``carrot.delay.00`` ... ``carrot.delay.27``; level L has a
queue-level TTL of 2^L seconds. A message to be delivered in D seconds is published to the exchange of
the top level with a routing key that spells D in binary, least significant bit first, one word per
level (``1.1.0.0...`` is 3 s). Each level has a topic exchange of its own (same name) that sends the
message into its queue when its bit is 1, or straight on to the level below when it is 0; the queue
dead-letters an expired message to the exchange of the level below, and level 0 to
``carrot.delay.deliver``, a headers exchange where every carrot queue is bound by its name
(header ``carrot-queue``). So a message spends exactly D seconds in at most LEVELS queues, and every level
queue holds messages of one TTL only: they expire in the order they came in, and a short delay never
waits behind a long one (the head-of-line blocking of per-message TTLs). NServiceBus and kombu's native
delayed delivery are built the same way; carrot's routing keys are least significant bit first, so the
bindings of a level do not depend on how many levels there are.

Anything a foreign publisher puts into a level queue expires with the queue's TTL whatever its own
expiration says (the smaller of the two wins), and is then dropped as unroutable unless its routing key
and headers are carrot's: nothing put there can hold up carrot's messages. A message carrot sends round
the levels again (parked or retried) is published without the ``x-death`` headers of its earlier trip,
as RabbitMQ drops a message dead-lettered into a queue its ``x-death`` already names (a "cycle").

Declaring is idempotent (same names, same arguments). Delays longer than 2^LEVELS - 1 seconds go round
the levels more than once: the consumer parks a message that arrives before its time again for the rest.
"""
from __future__ import annotations

import math

DEFAULT_LEVELS = 28          # 2^28 - 1 s: about 8.5 years in one trip (CARROT['delay_levels'])
PREFIX = 'carrot.delay'
DELIVER_EXCHANGE = f'{PREFIX}.deliver'
TARGET_HEADER = 'carrot-queue'   # a headers exchange ignores binding arguments named x-...
# What RabbitMQ writes when it dead-letters a message; dropped from a copy sent round the levels again.
DEATH_HEADERS = ('x-death', 'x-first-death-queue', 'x-first-death-reason', 'x-first-death-exchange',
                 'x-last-death-queue', 'x-last-death-reason', 'x-last-death-exchange')


def level_name(level: int) -> str:
    """The queue and the exchange of one level (the same name for both)."""
    return f'{PREFIX}.{level:02d}'


def entry_exchange(levels: int) -> str:
    return level_name(levels - 1)


def whole_seconds(delay: float) -> int:
    """A delay in whole seconds, rounded up: a message is never delivered before its time."""
    return max(0, math.ceil(delay - 1e-9))


def routing_key(seconds: int, levels: int) -> str:
    """`seconds` in binary, least significant bit first, one word per level. A longer delay than the
    levels can spell is cut to their maximum (the rest is another trip)."""
    seconds = min(seconds, 2 ** levels - 1)
    return '.'.join('1' if seconds >> level & 1 else '0' for level in range(levels))


def level_queue_arguments(level: int, queue_type: str = 'classic') -> dict:
    """The arguments of level L's queue: TTL 2^L s, dead-lettered to the level below (or delivered)."""
    arguments = {
        'x-message-ttl': 2 ** level * 1000,
        'x-dead-letter-exchange': level_name(level - 1) if level else DELIVER_EXCHANGE,
    }
    if queue_type == 'quorum':  # not used yet: quorum queues are declared this way once carrot has them
        arguments.update({'x-queue-type': 'quorum', 'x-dead-letter-strategy': 'at-least-once',
                          'x-overflow': 'reject-publish'})
    elif queue_type != 'classic':
        raise ValueError(f'unknown queue type {queue_type!r}')
    return arguments


def bit_pattern(level: int, bit: str) -> str:
    """The topic pattern of routing keys whose bit `level` is `bit`."""
    return '*.' * level + bit + '.#'


def declare_delivery(channel) -> None:
    """The exchange the last level delivers through, where every carrot queue is bound by name."""
    channel.exchange_declare(DELIVER_EXCHANGE, exchange_type='headers', durable=True)


def bind_target(channel, queue_name: str) -> None:
    """Make `queue_name` reachable by delayed messages (idempotent)."""
    channel.queue_bind(queue_name, DELIVER_EXCHANGE,
                       arguments={'x-match': 'all', TARGET_HEADER: queue_name})


def declare_levels(channel, levels: int, declare_queue, queue_type: str = 'classic') -> None:
    """Declare the levels 0 .. levels-1 and the delivery exchange (idempotent). `declare_queue(channel,
    name, arguments)` declares a queue (carrot.amqp.declare turns a clash into QueueMismatchError)."""
    declare_delivery(channel)
    for level in range(levels):
        channel.exchange_declare(level_name(level), exchange_type='topic', durable=True)
    for level in range(levels):
        declare_level_queue(channel, level, declare_queue, queue_type)
        below = level_name(level - 1) if level else DELIVER_EXCHANGE
        channel.exchange_bind(destination=below, source=level_name(level), routing_key=bit_pattern(level, '0'))


def declare_level_queue(channel, level: int, declare_queue, queue_type: str = 'classic') -> None:
    """One level's queue, bound to its exchange for the keys whose bit is 1."""
    name = level_name(level)
    declare_queue(channel, name, level_queue_arguments(level, queue_type))
    channel.queue_bind(name, name, routing_key=bit_pattern(level, '1'))


# -- a level whose queue RabbitMQ can no longer run ----------------------------------------------------
#
# RabbitMQ 3.10 crashes a queue's process when it dead-letters a message whose x-death header is an array
# holding something other than tables (rabbit_dead_letter:update_x_death_header); a persistent message
# like that, put into a level queue by anyone who may publish on the virtual host, makes the queue crash
# again on every restart until RabbitMQ gives it up. Publishing into such a queue is nacked, so carrot
# notices it at its next delayed publish, deletes the queue (which removes the message) and declares it
# again. Messages that were in it are lost to the broker; their rows, scheduled in the database, are sent
# again by housekeeping once overdue (carrot.publish.sweep).

def broken_levels(channel, levels: int) -> list[int]:
    """The levels whose queue is missing or refuses messages. `channel` is in confirm mode; each probe is
    an empty message that expires at once and is dropped, unroutable, by the level below."""
    import pika
    import pika.exceptions as pe

    broken = []
    for level in range(levels):
        try:
            channel.basic_publish('', level_name(level), b'', pika.BasicProperties(expiration='0'),
                                  mandatory=True)
        except (pe.NackError, pe.UnroutableError):
            broken.append(level)
    return broken


def repair_levels(channel, levels: int, declare_queue, queue_type: str = 'classic') -> list[int]:
    """Delete and declare again every level that refuses messages; returns the levels repaired."""
    broken = broken_levels(channel, levels)
    for level in broken:
        channel.queue_delete(level_name(level))
        declare_level_queue(channel, level, declare_queue, queue_type)
    return broken


def delayed_headers(headers, queue_name: str) -> dict:
    """The headers of a copy sent round the levels: the message's own, without the dead-letter history
    of an earlier trip, naming the queue it is for."""
    kept = {key: value for key, value in (headers if isinstance(headers, dict) else {}).items()
            if key not in DEATH_HEADERS}
    kept[TARGET_HEADER] = queue_name
    return kept
