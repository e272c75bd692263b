"""Connections to RabbitMQ: the one factory every connection comes from, and what a failed one means.

`connect()` installs carrot's pika adaptations (carrot.amqp.pika_compat) before the first connection of
a process, so no code path can connect without them.
"""
from __future__ import annotations

import pika
import pika.exceptions as pe

from carrot.amqp import pika_compat
from carrot.config import BrokerConfig

# Errors that mean "this connection is gone": drop it, reconnect, try once more.
CONNECTION_ERRORS = (pe.AMQPConnectionError, pe.ConnectionWrongStateError, pe.ChannelWrongStateError,
                     pe.StreamLostError, ConnectionError, OSError)

PRECONDITION_FAILED = 406
NOT_FOUND = 404


def connect(broker: BrokerConfig, **overrides) -> pika.BlockingConnection:
    """A new blocking connection to `broker` (the caller owns and closes it)."""
    pika_compat.install()
    return pika.BlockingConnection(broker.connection_parameters(**overrides))


def close_quietly(connection) -> None:
    """Close a connection that may already be broken; nothing more can be done with it either way."""
    if connection is not None and connection.is_open:
        try:
            connection.close()
        except Exception:
            pass
