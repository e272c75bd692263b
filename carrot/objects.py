"""django-carrot 1.x's objects, kept for code written against them: VirtualHost, Message and the
message serializer. They are thin: the work is done in carrot.config, carrot.messages and carrot.broker."""
from __future__ import annotations

import uuid

from carrot import messages
from carrot.config import BrokerConfig, _Parser
from carrot.exceptions import CarrotConfigException


class VirtualHost:
    """A RabbitMQ virtual host. ``str()`` is the broker URL with the password masked."""

    def __init__(self, url: str | None = None, host: str = 'localhost', name: str = '/', port: int = 5672,
                 username: str = 'guest', password: str = 'guest', secure: bool = False):
        parser = _Parser()
        if url:
            config = parser.broker_from_url('url', url)
        else:
            config = parser.broker_from_dict('VirtualHost', dict(
                host=host, name=name, port=port, username=username, password=password, secure=secure))
        if parser.problems:
            raise CarrotConfigException('; '.join(p.message for p in parser.problems))
        self.config = config

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
        from carrot.broker import connect
        return connect(self.config)

    def __str__(self):
        return self.config.url

    def __repr__(self):
        return f'VirtualHost({self.config.url!r})'

    def __eq__(self, other):
        return isinstance(other, VirtualHost) and other.config == self.config

    def __hash__(self):
        return hash(self.config)


class DefaultMessageSerializer:
    """How a message names its task and carries its arguments (the 1.x extension point)."""
    type_header = messages.TYPE_HEADER
    content_type = messages.CONTENT_TYPE
    message_type = messages.MESSAGE_TYPE

    def get_task_type(self, properties, body) -> str:
        return messages.task_type(properties)

    def serialize_arguments(self, body) -> tuple[list, dict]:
        """(args, kwargs) from a body; the 1.x name, kept (it deserialises)."""
        return messages.decode_arguments(body)

    def get_task(self, properties, body):
        from carrot.registry import get_task
        return get_task(self.get_task_type(properties, body))


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
        """The 1.x Message for a carrot.publishing.Outgoing (keeps its uuid)."""
        message = cls(task=outgoing.task, queue=outgoing.queue, routing_key=outgoing.routing_key,
                      exchange=outgoing.exchange, priority=outgoing.priority, task_args=outgoing.args,
                      task_kwargs=outgoing.kwargs)
        message.uuid = outgoing.uuid
        return message

    def publish(self, on_commit: bool = True):
        """Check, log and send this message; see carrot.utilities.publish_message."""
        from carrot import publishing  # publishing imports the models; objects must not, at import time
        outgoing = publishing.prepare(self.task, self.task_args, self.task_kwargs, queue=self.queue,
                                      exchange=self.exchange, routing_key=self.routing_key,
                                      priority=self.priority, message_id=self.uuid)
        return publishing.enqueue(outgoing, on_commit=on_commit)
