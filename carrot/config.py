"""The CARROT setting, parsed once into small immutable objects.

`parse_config()` turns the raw dict into a `CarrotConfig` plus a list of `ConfigProblem`s (id, text). The
system checks (carrot/checks.py) report the problems; `get_config()` is what the rest of carrot calls and
raises `CarrotConfigException` naming every problem. This module imports nothing from pika, so the
supervisor master can use it without opening or importing a broker client.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, parse_qs

from carrot.exceptions import CarrotConfigException
from carrot.options import SETTINGS as SUPERVISOR_SETTINGS, SupervisorSettings

DEFAULT_BROKER = 'amqp://guest:guest@localhost:5672/'
DEFAULT_QUEUE = 'default'
DEFAULT_MAX_PRIORITY = 255  # what django-carrot 1.x declared; a different value would clash with its queues

# Check ids, one per kind of problem (documented in README.rst).
E_NOT_A_DICT = 'carrot.E001'
E_UNKNOWN_KEY = 'carrot.E002'
E_BAD_VALUE = 'carrot.E003'
E_DUPLICATE_QUEUE = 'carrot.E004'
E_BAD_BROKER = 'carrot.E005'
E_NOT_IMPORTABLE = 'carrot.E006'


@dataclass(frozen=True)
class ConfigProblem:
    id: str
    message: str

    def __str__(self):
        return f'{self.id}: {self.message}'


@dataclass(frozen=True)
class BrokerConfig:
    """Where a RabbitMQ virtual host is. `str()` and `repr()` never show the password."""
    host: str = 'localhost'
    port: int = 5672
    virtual_host: str = '/'
    username: str = 'guest'
    password: str = field(default='guest', repr=False)
    secure: bool = False
    heartbeat: int | None = None  # seconds; None lets the broker propose (RabbitMQ: 60)

    @property
    def url(self) -> str:
        """The broker URL with the password masked: safe for logs, process titles and the monitor."""
        scheme = 'amqps' if self.secure else 'amqp'
        return f'{scheme}://{quote(self.username, safe="")}:***@{self.host}:{self.port}/' \
               f'{quote(self.virtual_host, safe="")}'

    def __str__(self):
        return self.url

    def __repr__(self):
        return f'BrokerConfig({self.url!r})'

    def connection_parameters(self, **overrides):
        """pika connection parameters for this broker; pika is imported only by code that connects."""
        import ssl

        import pika

        options = dict(
            host=self.host, port=self.port, virtual_host=self.virtual_host,
            credentials=pika.PlainCredentials(self.username, self.password),
            # A dead broker should fail a publish in seconds, not hang a web request.
            connection_attempts=1, socket_timeout=5, blocked_connection_timeout=30,
        )
        if self.heartbeat is not None:
            options['heartbeat'] = self.heartbeat
        if self.secure:
            options['ssl_options'] = pika.SSLOptions(ssl.create_default_context(), self.host)
        options.update(overrides)
        return pika.ConnectionParameters(**options)


@dataclass(frozen=True)
class QueueConfig:
    name: str
    broker: BrokerConfig
    concurrency: int = 1
    consumable: bool = True
    consumer_class: str = 'carrot.consumer.Consumer'
    max_priority: int = DEFAULT_MAX_PRIORITY

    @property
    def dead_letter_queue(self) -> str:
        return f'{self.name}.dead'


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
    store_and_forward: bool = True  # a publish the broker cannot take now waits in its row (else raises)
    supervisor_gone_after: float = 60.0  # the monitor shows a supervisor not seen for this long as gone

    def queue(self, name: str | None) -> QueueConfig:
        """The queue called `name` (None means the default queue)."""
        name = name or DEFAULT_QUEUE
        for queue in self.queues:
            if queue.name == name:
                return queue
        known = ', '.join(repr(q.name) for q in self.queues)
        raise CarrotConfigException(
            f"there is no queue called {name!r} in CARROT['queues'] (configured: {known})")

    @property
    def consumable_queues(self) -> tuple[QueueConfig, ...]:
        return tuple(q for q in self.queues if q.consumable)


_BROKER_DICT_KEYS = {'host', 'port', 'name', 'username', 'password', 'secure', 'heartbeat', 'url'}
_QUEUE_KEYS = {'name', 'host', 'concurrency', 'consumable', 'consumer_class', 'max_priority'}


class _Parser:
    """Walks the raw setting, collecting every problem instead of stopping at the first."""

    def __init__(self):
        self.problems: list[ConfigProblem] = []

    def problem(self, check_id, message):
        self.problems.append(ConfigProblem(check_id, message))

    def bad_value(self, path, expected, value):
        self.problem(E_BAD_VALUE, f'{path} must be {expected}, got {shown(value)}')

    def unknown_keys(self, path, raw, allowed):
        for key in sorted(set(raw) - allowed, key=str):
            self.problem(E_UNKNOWN_KEY, f'{path} has an unknown key {shown(key)} '
                                        f'(allowed: {", ".join(sorted(allowed))})')

    # -- scalar helpers: each returns the default after recording a problem, so parsing goes on

    def positive_int(self, path, value, default, allow_none=False):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.bad_value(path, 'a positive integer' + (' or None' if allow_none else ''), value)
            return default
        return value

    def positive_number(self, path, value, default, allow_none=False):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.bad_value(path, 'a positive number' + (' or None' if allow_none else ''), value)
            return default
        return value

    def boolean(self, path, value, default):
        if not isinstance(value, bool):
            self.bad_value(path, 'True or False', value)
            return default
        return value

    def dotted_paths(self, path, value):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            self.bad_value(path, 'a list of dotted import paths', value)
            return ()
        return tuple(value)

    # -- brokers

    def broker(self, path, raw) -> BrokerConfig:
        if isinstance(raw, str):
            return self.broker_from_url(path, raw)
        if isinstance(raw, dict):
            return self.broker_from_dict(path, raw)
        self.problem(E_BAD_BROKER, f'{path} must be an amqp:// URL or a dict, got {shown_broker(raw)}')
        return BrokerConfig()

    def broker_from_url(self, path, url) -> BrokerConfig:
        def fail(reason):
            self.problem(E_BAD_BROKER, f'{path} is not a usable broker URL ({reason}): {shown_broker(url)}')
            return BrokerConfig()

        if not isinstance(url, str):
            return fail(f'a URL is a string, got {type(url).__name__}')
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # its text may quote part of the password: not shown
            return fail(ENCODE_HINT if '@' in url else 'the host or port does not parse')
        if '@' in parts.path + parts.query + parts.fragment:
            # urlsplit ended the user:password part early, at a '/', '?' or '#' inside it.
            return fail(ENCODE_HINT)
        if parts.scheme not in ('amqp', 'amqps'):
            return fail('the scheme must be amqp:// or amqps://')
        if not parts.hostname:
            return fail('no host')
        secure = parts.scheme == 'amqps'
        # A URL without a path, or with a bare '/', means the default virtual host '/'.
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else '/'
        heartbeat = None
        query = parse_qs(parts.query)
        unknown = set(query) - {'heartbeat'}
        if unknown:
            return fail(f'unsupported query parameter(s) {", ".join(sorted(unknown))}; only heartbeat')
        if 'heartbeat' in query:
            try:
                heartbeat = int(query['heartbeat'][-1])
            except ValueError:
                return fail('heartbeat must be a whole number of seconds')
        return BrokerConfig(
            host=parts.hostname, port=port or (5671 if secure else 5672), virtual_host=vhost,
            username=unquote(parts.username) if parts.username is not None else 'guest',
            password=unquote(parts.password) if parts.password is not None else 'guest',
            secure=secure, heartbeat=heartbeat)

    def broker_from_dict(self, path, raw) -> BrokerConfig:
        self.unknown_keys(path, raw, _BROKER_DICT_KEYS)
        if 'url' in raw:  # django-carrot 1.x's VirtualHost(url=...) spelling
            return self.broker_from_url(f"{path}['url']", raw['url'])
        values = {}
        for key, expected, check in (
                ('host', 'a host name', lambda v: isinstance(v, str) and v),
                ('port', 'a port number', lambda v: isinstance(v, int) and not isinstance(v, bool)
                 and 0 < v < 65536),
                ('name', 'a virtual host name', lambda v: isinstance(v, str)),
                ('username', 'a string', lambda v: isinstance(v, str)),
                ('password', 'a string', lambda v: isinstance(v, str)),
                ('secure', 'True or False', lambda v: isinstance(v, bool)),
                ('heartbeat', 'a whole number of seconds', lambda v: isinstance(v, int)
                 and not isinstance(v, bool) and v >= 0)):
            if key in raw:
                if check(raw[key]):
                    values[key] = raw[key]
                else:
                    shown = '***' if key == 'password' else raw[key]
                    self.problem(E_BAD_BROKER, f"{path}['{key}'] must be {expected}, got {shown!r}")
        vhost = values.pop('name', '/') or '/'
        if vhost.lower() == '%2f':  # 1.x spelled the default vhost URL-encoded
            vhost = '/'
        secure = values.get('secure', False)
        values.setdefault('port', 5671 if secure else 5672)
        return BrokerConfig(virtual_host=vhost, **values)

    # -- the whole setting

    def queue(self, path, raw, default_broker) -> QueueConfig | None:
        if not isinstance(raw, dict):
            self.bad_value(path, 'a dict', raw)
            return None
        self.unknown_keys(path, raw, _QUEUE_KEYS)
        name = raw.get('name')
        if not isinstance(name, str) or not name:
            self.bad_value(f"{path}['name']", 'a non-empty string', name)
            return None
        broker = self.broker(f"{path}['host']", raw['host']) if 'host' in raw else default_broker
        consumer_class = raw.get('consumer_class', 'carrot.consumer.Consumer')
        if not isinstance(consumer_class, str) or '.' not in consumer_class:
            self.bad_value(f"{path}['consumer_class']", 'a dotted import path', consumer_class)
            consumer_class = 'carrot.consumer.Consumer'
        max_priority = raw.get('max_priority', DEFAULT_MAX_PRIORITY)
        if isinstance(max_priority, bool) or not isinstance(max_priority, int) \
                or not 1 <= max_priority <= 255:
            self.bad_value(f"{path}['max_priority']", 'an integer from 1 to 255', max_priority)
            max_priority = DEFAULT_MAX_PRIORITY
        return QueueConfig(
            name=name, broker=broker,
            concurrency=self.positive_int(f"{path}['concurrency']", raw.get('concurrency', 1), 1),
            consumable=self.boolean(f"{path}['consumable']", raw.get('consumable', True), True),
            consumer_class=consumer_class, max_priority=max_priority)

    def supervisor_settings(self, raw) -> dict:
        """The supervisor's keys that `raw` sets, checked as carrot.options declares them."""
        values = {}
        for option in SUPERVISOR_SETTINGS:
            if option.setting in raw:
                validate = getattr(self, option.kind.validator)
                none_allowed = {'allow_none': True} if option.optional else {}
                values[option.setting] = validate(f"CARROT['{option.setting}']", raw[option.setting],
                                                  option.default, **none_allowed)
        return values

    def config(self, raw) -> CarrotConfig:
        if not isinstance(raw, dict):
            self.problem(E_NOT_A_DICT, f'CARROT must be a dict, got {type(raw).__name__}')
            return CarrotConfig(queues=(QueueConfig(DEFAULT_QUEUE, BrokerConfig()),))
        allowed = {f.name for f in dataclasses.fields(CarrotConfig)}
        self.unknown_keys('CARROT', raw, allowed)
        defaults = CarrotConfig()
        default_broker = self.broker("CARROT['default_broker']", raw.get('default_broker', DEFAULT_BROKER))

        queues = []
        raw_queues = raw.get('queues', [])
        if not isinstance(raw_queues, (list, tuple)):
            self.bad_value("CARROT['queues']", 'a list of dicts', raw_queues)
            raw_queues = []
        seen = set()
        for index, raw_queue in enumerate(raw_queues):
            queue = self.queue(f"CARROT['queues'][{index}]", raw_queue, default_broker)
            if queue is None:
                continue
            if queue.name in seen:
                self.problem(E_DUPLICATE_QUEUE, f"CARROT['queues'][{index}] repeats the queue name "
                                                f'{queue.name!r}; queue names must be unique')
                continue
            seen.add(queue.name)
            queues.append(queue)
        if DEFAULT_QUEUE not in seen:
            # As in django-carrot 1.x, there is always a `default` queue for publishes that name none.
            queues.insert(0, QueueConfig(DEFAULT_QUEUE, default_broker))

        def get(key, parse, **kwargs):
            return parse(f"CARROT['{key}']", raw[key], getattr(defaults, key), **kwargs) \
                if key in raw else getattr(defaults, key)

        def days(key):
            value = raw.get(key, getattr(defaults, key))
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                self.bad_value(f"CARROT['{key}']", 'a number of days >= 0, or None to turn it off', value)
                value = getattr(defaults, key)
            return value or None

        return CarrotConfig(
            default_broker=default_broker,
            queues=tuple(queues),
            task_modules=self.dotted_paths("CARROT['task_modules']", raw.get('task_modules', [])),
            monitor_authentication=self.dotted_paths("CARROT['monitor_authentication']",
                                                     raw.get('monitor_authentication', [])),
            max_attempts=get('max_attempts', self.positive_int),
            cleanup_after_days=days('cleanup_after_days'),
            max_message_size=get('max_message_size', self.positive_int),
            max_stored_text=get('max_stored_text', self.positive_int),
            cleanup_failed_after_days=days('cleanup_failed_after_days'),
            dead_letter_ttl_days=days('dead_letter_ttl_days'),
            claim_lease=get('claim_lease', self.positive_number),
            store_and_forward=get('store_and_forward', self.boolean),
            supervisor_gone_after=get('supervisor_gone_after', self.positive_number),
            **self.supervisor_settings(raw),
        )


ENCODE_HINT = ("a '/', '?', '#' or '@' in the user name or password must be percent-encoded "
               "(%2F, %3F, %23, %40), or give the broker as a dict")
SHOWN_LENGTH = 300  # characters of a setting's value quoted in a message at most


def mask_url(url: str) -> str:
    """`url` with any password replaced by ***, even when it does not parse as a URL.

    Everything between the first ':' after the scheme and the last '@' counts as the password, so a
    password holding '/', '#', '?' or '@' is masked whole (a host or path is masked with it rather than
    a secret shown). Without an '@', a ':' followed by anything but a port number is masked too.
    """
    scheme, separator, rest = url.partition('://')
    if not separator:
        scheme, rest = '', url
    prefix = f'{scheme}://' if separator else ''
    at = rest.rfind('@')
    if at >= 0:
        user, colon, _ = rest[:at].partition(':')
        return f'{prefix}{user}:***@{rest[at + 1:]}' if colon else url
    if separator:
        netloc = rest.split('/', 1)[0]
        user, colon, port = netloc.partition(':')
        if colon and not port.isdigit():
            return f'{prefix}{user}:***'
    return url


def masked(value, depth: int = 0):
    """A copy of a setting's value safe to show: URL passwords and 'password' entries masked."""
    if depth > 6:
        return ...
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, (bytes, bytearray)):
        return mask_url(bytes(value).decode('latin-1')).encode('latin-1')
    if isinstance(value, dict):
        return {masked(k, depth + 1): '***' if isinstance(k, str) and k.lower() == 'password'
                else masked(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, depth + 1) for v in value]
    if isinstance(value, (tuple, set, frozenset)):
        return tuple(masked(v, depth + 1) for v in value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _Opaque(type(value).__name__)  # its repr is its own business: it might hold a secret


class _Opaque:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f'<{self.name} object>'


def shown_broker(value) -> str:
    """A broker setting that is not a usable URL, for a message. Whatever it is, it may be (or hold) the
    password itself, so only its shape is shown: the scheme and what follows the last '@' of a URL-like
    string, else its type and length."""
    if isinstance(value, str):
        scheme, separator, rest = value.partition('://')
        if separator and '@' in rest and len(scheme) < 10 and scheme.isalpha():
            credentials, _, where = rest.rpartition('@')
            user = credentials.partition(':')[0]
            user = user if re.fullmatch(r'[\w.%-]{1,64}', user) else '***'
            return repr(f'{scheme}://{user}:***@{where}'[:SHOWN_LENGTH])
        return f'a string of {len(value)} characters'
    return f'a {type(value).__name__}'


def shown(value) -> str:
    """repr() of a setting's value for a message: secrets masked, length bounded."""
    try:
        text = repr(masked(value))
    except Exception:  # a hostile __eq__/__hash__ in a key; say only what it is
        text = f'<{type(value).__name__} object>'
    return text if len(text) <= SHOWN_LENGTH else text[:SHOWN_LENGTH] + '...'


def parse_config(raw: Any) -> tuple[CarrotConfig, list[ConfigProblem]]:
    """Parse a raw CARROT value. The config is usable (bad parts replaced by defaults) even with problems."""
    parser = _Parser()
    config = parser.config({} if raw is None else raw)
    return config, parser.problems


def config_from_settings(settings) -> tuple[CarrotConfig, list[ConfigProblem]]:
    return parse_config(getattr(settings, 'CARROT', None))


@functools.lru_cache(maxsize=1)
def _cached_config() -> CarrotConfig:
    from django.conf import settings
    config, problems = config_from_settings(settings)
    if problems:
        raise CarrotConfigException('the CARROT setting is invalid:\n' +
                                    '\n'.join(f'  {p}' for p in problems))
    return config


def get_config() -> CarrotConfig:
    """The parsed CARROT setting of this process. Raises CarrotConfigException if it is invalid."""
    return _cached_config()


def clear_config_cache(**kwargs):
    """Forget the parsed setting (connected to Django's setting_changed for override_settings)."""
    _cached_config.cache_clear()
