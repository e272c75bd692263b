"""The CARROT setting, parsed once into the immutable objects of carrot.config.schema.

`parse_config()` turns the raw dict into a `CarrotConfig` plus a list of `ConfigProblem`s (id, text). The
system checks (carrot/checks.py) report the problems; `get_config()` is what the rest of carrot calls and
raises `CarrotConfigException` naming every problem. This module imports nothing from pika, so the
supervisor master can use it without opening or importing a broker client.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any
from urllib.parse import unquote, urlsplit, parse_qs

from carrot.config.options import LOG_LEVELS, SETTINGS as SUPERVISOR_SETTINGS
from carrot.config.schema import (DEFAULT_BROKER, DEFAULT_MAX_PRIORITY, DEFAULT_PREFETCH, DEFAULT_QUEUE,
                                  QUEUE_TYPES, QUORUM, TRACK_LEVELS, BrokerConfig, CarrotConfig, ConfigProblem,
                                  QueueConfig, node_text)
from carrot.config.secrets import ENCODE_HINT, masked_repr, broker_shape
from carrot.exceptions import CarrotConfigException, InvalidCall
from carrot.names import MAX_NAME_LENGTH, MAX_QUEUE_NAME_BYTES, check_name

# Check ids, one per kind of problem (documented in README.rst).
E_NOT_A_DICT = 'carrot.E001'
E_UNKNOWN_KEY = 'carrot.E002'
E_BAD_VALUE = 'carrot.E003'
E_DUPLICATE_QUEUE = 'carrot.E004'
E_BAD_BROKER = 'carrot.E005'
E_NOT_IMPORTABLE = 'carrot.E006'

# A consumer runs one task at a time; what it holds beyond that only waits (and no other consumer can
# take it meanwhile), so a few are plenty.
MAX_PREFETCH = 100
MAX_DELAY_LEVELS = 32  # 2^32 s is 136 years; carrot.amqp.delays reads the same bound

_BROKER_DICT_KEYS = {'host', 'hosts', 'port', 'name', 'username', 'password', 'secure', 'heartbeat', 'url'}
_QUEUE_KEYS = {'name', 'host', 'concurrency', 'consumable', 'consumer_class', 'max_priority', 'queue_type',
               'delivery_limit', 'track', 'prefetch'}
# What the nodes named by one broker setting must share: a cluster is one broker with one set of users.
_SHARED_BY_NODES = (('username', 'user name'), ('password', 'password'), ('virtual_host', 'virtual host'),
                    ('secure', 'scheme (amqp:// or amqps://)'), ('heartbeat', 'heartbeat'))


class Parser:
    """Walks the raw setting, collecting every problem instead of stopping at the first."""

    def __init__(self):
        self.problems: list[ConfigProblem] = []

    def problem(self, check_id, message):
        problem = ConfigProblem(check_id, message)
        if problem not in self.problems:  # a default every queue inherits is reported once
            self.problems.append(problem)

    def bad_value(self, path, expected, value):
        self.problem(E_BAD_VALUE, f'{path} must be {expected}, got {masked_repr(value)}')

    def unknown_keys(self, path, raw, allowed):
        for key in sorted(set(raw) - allowed, key=str):
            self.problem(E_UNKNOWN_KEY, f'{path} has an unknown key {masked_repr(key)} '
                                        f'(allowed: {", ".join(sorted(allowed))})')

    # -- scalar helpers: each returns the default after recording a problem, so parsing goes on

    def positive_int(self, path, value, default, allow_none=False):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.bad_value(path, 'a positive integer' + (' or None' if allow_none else ''), value)
            return default
        return value

    def whole_number(self, path, value, default):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.bad_value(path, 'a whole number >= 0', value)
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

    def delay_levels(self, value):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DELAY_LEVELS:
            self.bad_value("CARROT['delay_levels']", f'an integer from 1 to {MAX_DELAY_LEVELS}', value)
            return CarrotConfig.delay_levels
        return value

    def log_level(self, path, value, default):
        if isinstance(value, str) and value.upper() in LOG_LEVELS:
            return value.upper()
        self.bad_value(path, f'one of {", ".join(LOG_LEVELS)}', value)
        return default

    def dotted_paths(self, path, value):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            self.bad_value(path, 'a list of dotted import paths', value)
            return ()
        return tuple(value)

    # -- brokers

    def broker(self, path, raw) -> BrokerConfig:
        if isinstance(raw, str):
            return self.broker_from_url(path, raw)
        if isinstance(raw, (list, tuple)):
            return self.broker_from_urls(path, raw)
        if isinstance(raw, dict):
            return self.broker_from_dict(path, raw)
        self.problem(E_BAD_BROKER, f'{path} must be an amqp:// URL, a list of them (the nodes of a cluster) '
                                   f'or a dict, got {broker_shape(raw)}')
        return BrokerConfig()

    def broker_from_urls(self, path, urls) -> BrokerConfig:
        """The nodes of one cluster as a list of URLs, which differ only in host and port."""
        if not urls:
            self.problem(E_BAD_BROKER, f'{path} is an empty list: name at least one node')
            return BrokerConfig()
        before = len(self.problems)
        nodes = [self.broker_from_url(f'{path}[{index}]', url) for index, url in enumerate(urls)]
        if len(self.problems) > before:
            return BrokerConfig()
        first = nodes[0]
        for index, node in enumerate(nodes[1:], start=1):
            for attribute, what in _SHARED_BY_NODES:
                if getattr(node, attribute) != getattr(first, attribute):
                    self.problem(E_BAD_BROKER, f'{path}[{index}] has another {what} than {path}[0]: the nodes '
                                               f'of one broker share the user, password, virtual host, scheme '
                                               f'and heartbeat (a list names the nodes of one cluster)')
                    return BrokerConfig()
        return self.with_nodes(path, first, [(node.host, node.port) for node in nodes])

    def with_nodes(self, path, broker: BrokerConfig, nodes: list) -> BrokerConfig:
        """`broker` on `nodes` (the first is host:port); a node named twice is a problem."""
        seen = set()
        for index, node in enumerate(nodes):
            if node in seen:
                self.problem(E_BAD_BROKER, f'{path}[{index}] names the node {node_text(node)} a second time')
            seen.add(node)
        (host, port), *others = dict.fromkeys(nodes)
        return dataclasses.replace(broker, host=host, port=port, other_nodes=tuple(others))

    def hosts(self, path, raw, default_port) -> list | None:
        """The dict form's 'hosts': ['rabbit1:5672', 'rabbit2', '[::1]:5673'] -> [(host, port), ...]."""
        if not isinstance(raw, (list, tuple)) or not raw:
            # Only its shape: whatever stands where the hosts belong may be, or hold, the password.
            self.problem(E_BAD_BROKER, f"{path} must be a non-empty list of 'host' or 'host:port' strings, "
                                       f'got {broker_shape(raw)}')
            return None
        nodes = []
        for index, entry in enumerate(raw):
            node = None
            if isinstance(entry, str) and entry and not any(c in entry for c in '@/?#\\ ') and entry.isprintable():
                try:
                    parts = urlsplit(f'//{entry}')
                    node = (parts.hostname, parts.port or default_port) if parts.hostname else None
                except ValueError:
                    node = None
            if node is None:
                self.problem(E_BAD_BROKER, f"{path}[{index}] must be 'host' or 'host:port', got "
                                           f'{broker_shape(entry)}')
                return None
            nodes.append(node)
        return nodes

    def broker_from_url(self, path, url) -> BrokerConfig:
        def fail(reason):
            self.problem(E_BAD_BROKER, f'{path} is not a usable broker URL ({reason}): {broker_shape(url)}')
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
        if 'url' in raw:  # django-carrot 1.x's VirtualHost(url=...) spelling; a list names a cluster's nodes
            url = raw['url']
            return self.broker_from_urls(f"{path}['url']", url) if isinstance(url, (list, tuple)) else \
                self.broker_from_url(f"{path}['url']", url)
        if 'host' in raw and 'hosts' in raw:
            self.problem(E_BAD_BROKER, f"{path} gives both 'host' and 'hosts': name one node with 'host', or "
                                       f"every node of a cluster with 'hosts'")
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
                    shown = "'***'" if key == 'password' else masked_repr(raw[key])
                    self.problem(E_BAD_BROKER, f"{path}['{key}'] must be {expected}, got {shown}")
        vhost = values.pop('name', '/') or '/'
        if vhost.lower() == '%2f':  # 1.x spelled the default vhost URL-encoded
            vhost = '/'
        secure = values.get('secure', False)
        values.setdefault('port', 5671 if secure else 5672)
        broker = BrokerConfig(virtual_host=vhost, **values)
        if 'hosts' in raw and 'host' not in raw:
            nodes = self.hosts(f"{path}['hosts']", raw['hosts'], values['port'])
            if nodes:
                broker = self.with_nodes(f"{path}['hosts']", broker, nodes)
        return broker

    # -- the whole setting

    def queue_type(self, path, value, default):
        if value in QUEUE_TYPES:
            return value
        self.bad_value(path, ' or '.join(repr(t) for t in QUEUE_TYPES), value)
        return default

    def queue(self, path, raw, default_broker, defaults: CarrotConfig) -> QueueConfig | None:
        if not isinstance(raw, dict):
            self.bad_value(path, 'a dict', raw)
            return None
        self.unknown_keys(path, raw, _QUEUE_KEYS)
        name = raw.get('name')
        if not isinstance(name, str) or not name:
            self.bad_value(f"{path}['name']", 'a non-empty string', name)
            return None
        try:
            check_name('a queue name', name, max_bytes=MAX_QUEUE_NAME_BYTES)
        except InvalidCall:
            self.bad_value(f"{path}['name']", f'a queue name RabbitMQ and the log table take (at most '
                                               f'{MAX_NAME_LENGTH} characters and {MAX_QUEUE_NAME_BYTES} bytes in '
                                               f'UTF-8, leaving room for .dead; no NUL)', name)
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
        queue_type = self.queue_type(f"{path}['queue_type']", raw.get('queue_type', defaults.queue_type),
                                     defaults.queue_type)
        delivery_limit = None
        if queue_type == QUORUM:
            if 'max_priority' in raw:
                self.problem(E_BAD_VALUE, f"{path}['max_priority'] is for classic queues: a quorum queue has "
                                          f'no x-max-priority (see README.rst, "Running on several hosts")')
            delivery_limit = self.positive_int(f"{path}['delivery_limit']",
                                               raw.get('delivery_limit', defaults.delivery_limit),
                                               defaults.delivery_limit, allow_none=True)
            if delivery_limit is not None and delivery_limit <= defaults.max_attempts:
                where = f"{path}['delivery_limit']" if 'delivery_limit' in raw else "CARROT['delivery_limit']"
                self.problem(E_BAD_VALUE, f'{where} ({delivery_limit}) must be above max_attempts '
                                          f'({defaults.max_attempts}), or RabbitMQ dead-letters a message '
                                          f'before carrot has marked it FAILED')
        elif 'delivery_limit' in raw:
            self.problem(E_BAD_VALUE, f"{path}['delivery_limit'] is for quorum queues (RabbitMQ's "
                                      f"x-delivery-limit); this queue is {queue_type}")
        return QueueConfig(
            name=name, broker=broker,
            concurrency=self.positive_int(f"{path}['concurrency']", raw.get('concurrency', 1), 1),
            consumable=self.boolean(f"{path}['consumable']", raw.get('consumable', True), True),
            consumer_class=consumer_class, max_priority=max_priority, queue_type=queue_type,
            delivery_limit=delivery_limit, max_priority_set='max_priority' in raw,
            track=self.track(f"{path}['track']", raw.get('track', 'all')),
            prefetch=self.prefetch(f"{path}['prefetch']", raw.get('prefetch', DEFAULT_PREFETCH)))

    def prefetch(self, path, value):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PREFETCH:
            self.bad_value(path, f'an integer from 1 to {MAX_PREFETCH}', value)
            return DEFAULT_PREFETCH
        return value

    def track(self, path, value):
        if value in TRACK_LEVELS:
            return value
        self.bad_value(path, ' or '.join(repr(level) for level in TRACK_LEVELS), value)
        return 'all'

    def supervisor_settings(self, raw) -> dict:
        """The supervisor's keys that `raw` sets, checked as carrot.config.options declares them."""
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

        def get(key, parse, **kwargs):
            return parse(f"CARROT['{key}']", raw[key], getattr(defaults, key), **kwargs) \
                if key in raw else getattr(defaults, key)

        default_broker = self.broker("CARROT['default_broker']", raw.get('default_broker', DEFAULT_BROKER))
        # What every queue that does not say otherwise gets.
        queue_defaults = CarrotConfig(queue_type=get('queue_type', self.queue_type),
                                      delivery_limit=get('delivery_limit', self.positive_int, allow_none=True),
                                      max_attempts=get('max_attempts', self.positive_int))

        queues = []
        raw_queues = raw.get('queues', [])
        if not isinstance(raw_queues, (list, tuple)):
            self.bad_value("CARROT['queues']", 'a list of dicts', raw_queues)
            raw_queues = []
        seen = set()
        for index, raw_queue in enumerate(raw_queues):
            queue = self.queue(f"CARROT['queues'][{index}]", raw_queue, default_broker, queue_defaults)
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
            queues.insert(0, self.queue("CARROT's implicit default queue", {'name': DEFAULT_QUEUE},
                                        default_broker, queue_defaults))

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
            max_attempts=queue_defaults.max_attempts,
            cleanup_after_days=days('cleanup_after_days'),
            max_message_size=get('max_message_size', self.positive_int),
            max_stored_text=get('max_stored_text', self.positive_int),
            cleanup_failed_after_days=days('cleanup_failed_after_days'),
            dead_letter_ttl_days=days('dead_letter_ttl_days'),
            claim_lease=get('claim_lease', self.positive_number),
            claim_ahead=get('claim_ahead', self.boolean),
            store_and_forward=get('store_and_forward', self.boolean),
            supervisor_gone_after=get('supervisor_gone_after', self.positive_number),
            task_log_level=get('task_log_level', self.log_level),
            queue_type=queue_defaults.queue_type,
            delivery_limit=queue_defaults.delivery_limit,
            confirm_timeout=get('confirm_timeout', self.positive_number),
            delay_levels=self.delay_levels(raw.get('delay_levels', defaults.delay_levels)),
            delay_sweep_after=get('delay_sweep_after', self.positive_number),
            max_retries=get('max_retries', self.whole_number),
            retry_backoff=get('retry_backoff', self.positive_number),
            retry_backoff_max=get('retry_backoff_max', self.positive_number),
            async_commits=get('async_commits', self.boolean),
            **self.supervisor_settings(raw),
        )


def parse_config(raw: Any) -> tuple[CarrotConfig, list[ConfigProblem]]:
    """Parse a raw CARROT value. The config is usable (bad parts replaced by defaults) even with problems."""
    parser = Parser()
    config = parser.config({} if raw is None else raw)
    return config, parser.problems


def parse_broker(raw, where: str = 'broker') -> BrokerConfig:
    """A broker setting (URL or dict) on its own; CarrotConfigException naming every problem."""
    parser = Parser()
    broker = parser.broker(where, raw)
    if parser.problems:
        raise CarrotConfigException('; '.join(p.message for p in parser.problems))
    return broker


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

