"""Connections to RabbitMQ: the one factory every connection comes from, and what a failed one means.

`connect()` installs carrot's pika adaptations (carrot.amqp.pika_compat) before the first connection of
a process, so no code path can connect without them.
"""
from __future__ import annotations

import socket

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


def describe_connection_error(exc: BaseException, broker: BrokerConfig) -> str:
    """What went wrong connecting to `broker`, once, in words a person can act on (never the password)."""
    where = f'{broker.host}:{broker.port}'
    cause = exc.args[0] if isinstance(exc, pe.AMQPConnectionError) and exc.args else exc
    cause = getattr(cause, 'exception', cause)  # pika wraps the socket's own error
    if isinstance(exc, pe.ProbableAuthenticationError):
        return (f'access refused for user {broker.username!r} on vhost {broker.virtual_host!r} at {where}: '
                f'the user name or password is wrong')
    if isinstance(exc, pe.ProbableAccessDeniedError):
        said = str(cause).rsplit(' - ', 1)[-1].strip("'\"")
        fix = (f'create it (rabbitmqctl add_vhost {broker.virtual_host})' if 'not found' in said else
               f"grant it (rabbitmqctl set_permissions -p {broker.virtual_host} {broker.username} '.*' '.*' '.*')")
        return (f'access refused for user {broker.username!r} on vhost {broker.virtual_host!r} at {where} '
                f'(RabbitMQ says: {said}); {fix}')
    if isinstance(cause, ConnectionRefusedError):
        return f'connection refused at {where}: is RabbitMQ running there? (start it, or fix the broker in CARROT)'
    if isinstance(cause, socket.gaierror):
        return f'the host name {broker.host!r} cannot be resolved ({cause.strerror})'
    if isinstance(cause, (TimeoutError, socket.timeout)) or 'timed out' in str(cause).lower():
        return f'no answer from {where} in time (a firewall, or the wrong host or port?)'
    text = str(exc).strip() or 'connection lost'
    return f'{type(exc).__name__}: {text} (at {where})'
