"""django-carrot 1.x's objects, kept for code written against them: VirtualHost, Message and the
message serializer. They are thin: the work is done in carrot.config, carrot.amqp and carrot.publish."""
from __future__ import annotations

import uuid

from carrot.amqp.wire import DefaultMessageSerializer
from carrot.config import BrokerConfig
from carrot.config.parse import parse_broker


class VirtualHost:
    """A RabbitMQ virtual host. ``str()`` is the broker URL with the password masked."""

    def __init__(self, url: str | None = None, host: str = 'localhost', name: str = '/', port: int = 5672,
                 username: str = 'guest', password: str = 'guest', secure: bool = False):
        self.config = parse_broker(url, where='url') if url else parse_broker(dict(
            host=host, name=name, port=port, username=username, password=password, secure=secure),
            where='VirtualHost')

    @classmethod
    def from_config(cls, config: BrokerConfig) -> VirtualHost:
        vhost = cls.__new__(cls)
        vhost.config = config
        return vhost

    host = property(lambda self: self.config.host)
    port = property(lambda self: self.config.port)
    name = property(lambda self: self.config.virtual_host)
    username = property(lambda self: self.config.username)
    password = property(lambda self: self.config.password)
    secure = property(lambda self: self.config.secure)

    @property
    def blocking_connection(self):
        """A new pika BlockingConnection to this virtual host; the caller closes it."""
        from carrot.amqp.connection import connect
        return connect(self.config)

    def __str__(self):
        return self.config.url

    def __repr__(self):
        return f'VirtualHost({self.config.url!r})'

    def __eq__(self, other):
        return isinstance(other, VirtualHost) and other.config == self.config

    def __hash__(self):
        return hash(self.config)


class Message:
    """A task call to publish. Build it with carrot.utilities.create_message(), which validates it."""

    def __init__(self, task: str, virtual_host: VirtualHost | None = None, queue: str = 'default',
                 routing_key: str | None = None, exchange: str = '', priority: int = 0,
                 task_args: tuple = (), task_kwargs: dict | None = None):
        self.uuid = str(uuid.uuid4())
        self.task = task
        self.queue = queue or 'default'
        self.routing_key = routing_key or self.queue
        self.exchange = exchange or ''
        self.priority = priority
        self.task_args = tuple(task_args)
        self.task_kwargs = dict(task_kwargs or {})
        self.virtual_host = virtual_host

    @classmethod
    def from_outgoing(cls, outgoing) -> Message:
        """The 1.x Message for a carrot.publish.outgoing.Outgoing (keeps its uuid)."""
        message = cls(task=outgoing.task, queue=outgoing.queue, routing_key=outgoing.routing_key,
                      exchange=outgoing.exchange, priority=outgoing.priority, task_args=outgoing.args,
                      task_kwargs=outgoing.kwargs)
        message.uuid = outgoing.uuid
        return message

    def publish(self, on_commit: bool = True):
        """Check, log and send this message; see carrot.utilities.publish_message."""
        from carrot.publish.outbox import enqueue  # it imports the models; objects must not, at import time
        from carrot.publish.outgoing import prepare
        outgoing = prepare(self.task, self.task_args, self.task_kwargs, queue=self.queue,
                                      exchange=self.exchange, routing_key=self.routing_key,
                                      priority=self.priority, message_id=self.uuid)
        return enqueue(outgoing, on_commit=on_commit)


__all__ = ['VirtualHost', 'Message', 'DefaultMessageSerializer']
