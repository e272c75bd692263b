"""The parsed CARROT setting: small immutable objects the rest of carrot reads.

`carrot.config.parse` builds them from the raw dict (and collects every problem); nothing else creates
them from settings. No Django and no pika at import time: the supervisor master imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote

from carrot.config.options import SupervisorSettings
from carrot.exceptions import UnknownQueue
from carrot.names import DEAD_LETTER_SUFFIX

DEFAULT_BROKER = 'amqp://guest:guest@localhost:5672/'
DEFAULT_QUEUE = 'default'
# A small priority range: RabbitMQ keeps one internal queue per level, and 255 levels (what django-carrot 1.x
# declared) cost the broker several times more per message than 10. An existing queue declared with
# another x-max-priority (a 1.x queue: 255) is adopted as it is unless CARROT names max_priority.
DEFAULT_MAX_PRIORITY = 10
# Deliveries a consumer holds: the running one and the next ones (README.rst, "Speed").
DEFAULT_PREFETCH = 8
TRACK_ALL, TRACK_FAILURES, TRACK_NONE = 'all', 'failures', 'none'
TRACK_LEVELS = (TRACK_ALL, TRACK_FAILURES, TRACK_NONE)  # what a queue's tasks write to MessageLog (README.rst, "Speed")
CLASSIC = 'classic'
QUORUM = 'quorum'
QUEUE_TYPES = (CLASSIC, QUORUM)
DEFAULT_QUEUE_TYPE = CLASSIC  # what 1.x queues are; a quorum queue is chosen per queue or for all in CARROT


@dataclass(frozen=True)
class ConfigProblem:
    id: str
    message: str

    def __str__(self):
        return f'{self.id}: {self.message}'


Node = tuple[str, int]  # (host, port) of one RabbitMQ node


@dataclass(frozen=True)
class BrokerConfig:
    """Where a RabbitMQ virtual host is: one node, or the nodes of a cluster (`host`:`port` first, then
    `other_nodes`), all with the same user, password and virtual host. `str()` and `repr()` never show the
    password."""
    host: str = 'localhost'
    port: int = 5672
    virtual_host: str = '/'
    username: str = 'guest'
    password: str = field(default='guest', repr=False)
    secure: bool = False
    heartbeat: int | None = None  # seconds; None lets the broker propose (RabbitMQ: 60)
    other_nodes: tuple[Node, ...] = ()

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every node of this broker, in the order the setting names them."""
        return ((self.host, self.port),) + self.other_nodes

    @property
    def url(self) -> str:
        """The broker URL with the password masked: safe for logs, process titles and the monitor. The
        nodes of a cluster are listed comma-separated (amqp://app:***@rabbit1:5672,rabbit2:5672/app)."""
        scheme = 'amqps' if self.secure else 'amqp'
        return f'{scheme}://{quote(self.username, safe="")}:***@{",".join(map(node_text, self.nodes))}/' \
               f'{quote(self.virtual_host, safe="")}'

    def __str__(self):
        return self.url

    def __repr__(self):
        return f'BrokerConfig({self.url!r})'

    def connection_parameters(self, node: Node | None = None, **overrides):
        """pika connection parameters for `node` of this broker (the first one by default); pika is
        imported only by code that connects (carrot.amqp.connection chooses the node)."""
        import ssl

        import pika

        host, port = node or self.nodes[0]
        options = dict(
            host=host, port=port, virtual_host=self.virtual_host,
            credentials=pika.PlainCredentials(self.username, self.password),
            # A dead broker should fail a publish in seconds, not hang a web request.
            connection_attempts=1, socket_timeout=5, blocked_connection_timeout=30,
        )
        if self.heartbeat is not None:
            options['heartbeat'] = self.heartbeat
        if self.secure:
            options['ssl_options'] = pika.SSLOptions(ssl.create_default_context(), host)
        options.update(overrides)
        return pika.ConnectionParameters(**options)


def node_text(node: Node) -> str:
    """host:port, with an IPv6 address in brackets ([::1]:5672)."""
    host, port = node
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


@dataclass(frozen=True)
class QueueConfig:
    name: str
    broker: BrokerConfig
    concurrency: int = 1
    consumable: bool = True
    consumer_class: str = 'carrot.consumer.Consumer'
    max_priority: int = DEFAULT_MAX_PRIORITY  # classic queues only: a quorum queue has no x-max-priority
    queue_type: str = DEFAULT_QUEUE_TYPE      # 'classic' or 'quorum' (carrot.amqp.declare says what each means)
    delivery_limit: int | None = None         # quorum queues: RabbitMQ's x-delivery-limit (None: not set)
    max_priority_set: bool = False            # CARROT names max_priority (else an existing queue's is adopted)
    track: str = 'all'                        # 'all', 'failures' or 'none': the rows its tasks write
    prefetch: int = DEFAULT_PREFETCH          # deliveries a consumer holds: the running one and those next

    @property
    def dead_letter_queue(self) -> str:
        return self.name + DEAD_LETTER_SUFFIX

    @property
    def is_quorum(self) -> bool:
        return self.queue_type == QUORUM


@dataclass(frozen=True)
class CarrotConfig(SupervisorSettings):
    """The parsed CARROT setting. The supervisor's keys (graceful_timeout, backoff_cap, ...) and their
    defaults are inherited from carrot.options, where each supervisor option is declared once."""
    default_broker: BrokerConfig = field(default_factory=BrokerConfig)
    queues: tuple[QueueConfig, ...] = ()
    task_modules: tuple[str, ...] = ()
    monitor_authentication: tuple[str, ...] = ()
    max_attempts: int = 3
    cleanup_after_days: float | None = 3
    # Hardening: sizes, ages and the claim lease (README.rst, "Limits and guarantees").
    max_message_size: int = 1024 * 1024   # bytes of an encoded message body; larger ones are refused
    max_stored_text: int = 64 * 1024      # characters kept of a task's output, exception, traceback and log
    cleanup_failed_after_days: float | None = 30  # FAILED rows older than this are deleted (None: kept)
    dead_letter_ttl_days: float | None = 14      # <queue>.dead drops messages older than this (None: kept)
    claim_lease: float = 60.0  # seconds an IN_PROGRESS claim lasts unless the running worker renews it
    # The deliveries a worker holds behind the running one are claimed with it, in one statement
    # (PostgreSQL; carrot.consume.ahead).
    claim_ahead: bool = True
    store_and_forward: bool = True  # a publish the broker cannot take now waits in its row (else raises)
    supervisor_gone_after: float = 60.0  # the monitor shows a supervisor not seen for this long as gone
    task_log_level: str = 'DEBUG'  # the lowest level of a task's own log lines kept in its MessageLog
    # Several hosts, a RabbitMQ cluster (README.rst, "Running on several hosts").
    queue_type: str = DEFAULT_QUEUE_TYPE  # the type of a queue that names none
    delivery_limit: int | None = 20  # quorum queues: deliveries before RabbitMQ itself dead-letters a message
    confirm_timeout: float = 10.0  # seconds a publish waits for RabbitMQ's confirm before it counts as unsent
    # Delays (README.rst, "Delayed tasks"): the binary delay levels of carrot.amqp.delays, and how long a
    # scheduled row may be overdue before housekeeping sends its message again (a hop lost, a broker reset).
    delay_levels: int = 28
    delay_sweep_after: float = 300.0
    # Retries (README.rst, "Retries"): the defaults of @carrot.task(max_retries=..., retry_backoff=...).
    max_retries: int = 0               # a failing task is not retried (as in 1.x)
    retry_backoff: float = 5.0         # seconds before the first retry; doubled for each next one
    retry_backoff_max: float = 3600.0  # the longest wait between two tries
    # Speed (README.rst, "Speed"): claims, lease renewals and the publisher's own rows commit without
    # waiting for PostgreSQL's disk flush (carrot.commits says why that loses nothing).
    async_commits: bool = True

    def queue(self, name: str | None) -> QueueConfig:
        """The queue called `name` (None means the default queue): one of CARROT['queues'], or of the
        Worker rows (carrot.models.Worker)."""
        name = name or DEFAULT_QUEUE
        for queue in self.queues:
            if queue.name == name:
                return queue
        extra = extra_queues(self)
        for queue in extra:
            if queue.name == name:
                return queue
        known = ', '.join(repr(q.name) for q in (*self.queues, *extra))
        raise UnknownQueue(
            f"there is no queue called {name!r} in CARROT['queues'] (configured: {known})")

    @property
    def all_queues(self) -> tuple[QueueConfig, ...]:
        """CARROT['queues'], then the queues of Worker rows (read from the database now) that CARROT does
        not name."""
        names = {q.name for q in self.queues}
        return self.queues + tuple(q for q in extra_queues(self) if q.name not in names)

    @property
    def consumable_queues(self) -> tuple[QueueConfig, ...]:
        return tuple(q for q in self.all_queues if q.consumable)


# Where queues besides CARROT['queues'] come from: carrot.models.worker_queues (the Worker rows), set by
# CarrotAppConfig.ready(), so this module needs neither Django nor the models.
_queue_source: Callable[[CarrotConfig], tuple[QueueConfig, ...]] | None = None


def set_queue_source(source: Callable[[CarrotConfig], tuple[QueueConfig, ...]] | None) -> None:
    global _queue_source
    _queue_source = source


def extra_queues(config: CarrotConfig) -> tuple[QueueConfig, ...]:
    return _queue_source(config) if _queue_source is not None else ()


