"""Connections to RabbitMQ: the one factory every connection comes from, which node of a cluster it goes
to, and what a failed one means.

`connect()` installs carrot's pika adaptations (carrot.amqp.pika_compat) before the first connection of
a process, so no code path can connect without them.

A broker may name several nodes (the nodes of a RabbitMQ cluster). Each process starts at a node of its
own, chosen at random, so the consumers, schedulers and publishers of several supervisors spread over the
cluster instead of all landing on the first node; it stays on the node that answered. A node that refused
a connection, or whose connection was lost (`connection_lost()`), is tried last until it answers again,
so a process whose node died moves to another one at its next connect, without first waiting on the
dead one. A connection never moves back on its own when the node returns: processes spread again as they
are replaced (max_tasks_per_child, HUP, a restart).
"""
from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import weakref

import pika
import pika.exceptions as pe

from carrot.amqp import pika_compat
from carrot.config import BrokerConfig, Node
from carrot.config.schema import node_text

logger = logging.getLogger('carrot.broker')


class NoNodeAnswered(pe.AMQPConnectionError):
    """None of a broker's nodes could be connected to. A pika connection error (so every path that
    reconnects treats it as one) that keeps each node's own error for `describe_connection_error`."""

    def __init__(self, failures: list[tuple[Node, BaseException]]):
        super().__init__('no node answered')
        self.failures = failures


# Errors that mean "this connection is gone": drop it, reconnect, try once more.
CONNECTION_ERRORS = (pe.AMQPConnectionError, pe.ConnectionWrongStateError, pe.ChannelWrongStateError,
                     pe.StreamLostError, ConnectionError, OSError)

PRECONDITION_FAILED = 406
NOT_FOUND = 404


def connect(broker: BrokerConfig, **overrides) -> pika.BlockingConnection:
    """A new blocking connection to a node of `broker` (the caller owns and closes it). Tries the nodes in
    this process's order (see the module docstring); NoNodeAnswered when a broker of several nodes has
    none that answers, the node's own pika error when it has one node."""
    pika_compat.install()
    failures = []
    for node in _nodes.order(broker):
        try:
            connection = pika_compat.blocking_connection(broker.connection_parameters(node, **overrides))
        except CONNECTION_ERRORS as exc:
            _nodes.failed(broker, node)
            failures.append((node, exc))
            continue
        _nodes.connected(broker, node, connection)
        if failures:
            logger.info('connected to node %s of %s; %s', node_text(node), broker,
                        '; '.join(f'{node_text(n)} did not answer ({describe_connection_error(e, broker, n)})'
                                  for n, e in failures))
        return connection
    if len(failures) == 1:
        raise failures[0][1]
    raise NoNodeAnswered(failures)


def node_of(connection) -> Node | None:
    """The node (host, port) a connection from `connect()` went to."""
    found = _nodes.by_connection.get(connection)
    return found[1] if found else None


def connection_lost(connection) -> None:
    """Say that `connection` broke (its node may be gone): this process tries that node last from now on,
    until it answers again."""
    found = _nodes.by_connection.get(connection)
    if found is not None:
        _nodes.failed(*found)


def close_quietly(connection) -> None:
    """Close a connection that may already be broken; nothing more can be done with it either way."""
    if connection is not None and connection.is_open:
        try:
            connection.close()
        except Exception:
            pass


class _NodeOrder:
    """This process's choice of node per broker: where it starts, and which nodes failed lately."""

    def __init__(self):
        self.lock = threading.Lock()
        self.preferred: dict[BrokerConfig, Node] = {}
        self.failed_at: dict[tuple[BrokerConfig, Node], float] = {}
        self.by_connection: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def order(self, broker: BrokerConfig) -> list[Node]:
        nodes = list(broker.nodes)
        if len(nodes) == 1:
            return nodes
        with self.lock:
            first = self.preferred.setdefault(broker, random.choice(nodes))
            start = nodes.index(first)
            rotated = nodes[start:] + nodes[:start]
            # Nodes that answer first, then those that failed, longest ago first (the likeliest back).
            return sorted(rotated, key=lambda node: self.failed_at.get((broker, node), 0.0))

    def connected(self, broker: BrokerConfig, node: Node, connection) -> None:
        with self.lock:
            self.preferred[broker] = node
            self.failed_at.pop((broker, node), None)
            self.by_connection[connection] = (broker, node)

    def failed(self, broker: BrokerConfig, node: Node) -> None:
        with self.lock:
            self.failed_at[(broker, node)] = time.monotonic()

    def forget(self) -> None:
        """In a forked child: choose afresh (random is reseeded after a fork), so children spread out."""
        self.lock = threading.Lock()
        self.preferred.clear()
        self.failed_at.clear()
        self.by_connection = weakref.WeakKeyDictionary()


_nodes = _NodeOrder()
os.register_at_fork(after_in_child=_nodes.forget)


def describe_connection_error(exc: BaseException, broker: BrokerConfig, node: Node | None = None) -> str:
    """What went wrong connecting to `broker` (at `node`, if known), once, in words a person can act on
    (never the password). For NoNodeAnswered: each node's own reason."""
    if isinstance(exc, NoNodeAnswered):
        return 'no node answered: ' + '; '.join(describe_connection_error(error, broker, failed)
                                                 for failed, error in exc.failures)
    host, port = node or broker.nodes[0]
    where = node_text((host, port)) if node or len(broker.nodes) == 1 else \
        ', '.join(map(node_text, broker.nodes))
    cause = exc.args[0] if isinstance(exc, pe.AMQPConnectionError) and exc.args else exc
    cause = getattr(cause, 'exception', cause)  # pika wraps the socket's own error
    if isinstance(exc, (pe.ProbableAuthenticationError, pe.ProbableAccessDeniedError)) \
            and 'ConnectionClosedByBroker' not in str(cause):
        # pika calls any connection lost during the login a "probable" refusal; RabbitMQ refuses by closing
        # the connection with a reason (403, 530). Lost otherwise (an interrupt, a proxy, a node going
        # down), it says nothing about the password.
        return (f'the connection to {where} was lost while logging in as {broker.username!r} on vhost '
                f'{broker.virtual_host!r} ({cause}); RabbitMQ did not refuse the login')
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
        return f'the host name {host!r} cannot be resolved ({cause.strerror})'
    if isinstance(cause, (TimeoutError, socket.timeout)) or 'timed out' in str(cause).lower():
        return f'no answer from {where} in time (a firewall, or the wrong host or port?)'
    text = str(exc).strip() or 'connection lost'
    return f'{type(exc).__name__}: {text} (at {where})'
