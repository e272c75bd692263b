"""The CARROT parser against generated bad settings (issue 6 §8, §9): every bad config is a list of check
errors, never a traceback, and the broker password never appears in any error text.

In-process for the parser and the system check (hypothesis), plus `carrot-supervisor --check` in a
subprocess for a few pinned shapes (exit 3, the errors printed, no traceback, no password).
"""
from __future__ import annotations

import math
import re
from decimal import Decimal

import pytest
from django.test import override_settings
from hypothesis import HealthCheck, given, settings, strategies as st

from carrot.checks import check_carrot_setting
from carrot.config import CarrotConfig, parse_config

SECRET = 'S3cr/et#pa?ss:w@rd%41'   # characters that break naive URL parsing: / # ? : @ %
SECRET_MARKS = [SECRET, 'S3cr', 'pa?ss', 'ss:w@rd', 'S3cr%2Fet']
KEYS = ['default_broker', 'queues', 'task_modules', 'monitor_authentication', 'max_attempts',
        'cleanup_after_days', 'max_message_size', 'max_stored_text', 'cleanup_failed_after_days',
        'dead_letter_ttl_days', 'claim_lease', 'store_and_forward', 'supervisor_gone_after',
        'graceful_timeout', 'heartbeat_timeout', 'task_time_limit', 'max_tasks_per_child',
        'max_memory_per_child', 'scheduler', 'max_consecutive_failures', 'backoff_cap', 'queue_type',
        'delivery_limit', 'confirm_timeout']
QUEUE_KEYS = ['name', 'host', 'concurrency', 'consumable', 'consumer_class', 'max_priority', 'queue_type',
              'delivery_limit']
BROKER_KEYS = ['host', 'hosts', 'port', 'name', 'username', 'password', 'secure', 'heartbeat', 'url']
CHECK_ID = re.compile(r'^carrot\.E\d{3}$')

HYPOTHESIS = dict(deadline=None, database=None, max_examples=200, suppress_health_check=list(HealthCheck))


class Weird:
    """An object whose str() and repr() raise: error messages must not."""
    def __repr__(self):
        raise RuntimeError('repr exploded')

    __str__ = __repr__


class Secretive:
    """An object whose repr() shows the password (e.g. a settings helper): shown values are the risk."""
    def __repr__(self):
        return f'<Secretive {SECRET}>'


scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2 ** 200, 2 ** 200),
    st.floats(), st.just(math.inf), st.just(-math.inf), st.just(math.nan), st.decimals(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=10), st.just(''), st.just('\x00'), st.just('\x1b[31m'),
    st.builds(Weird), st.just(object()), st.just(print), st.just(CarrotConfig),
)


def nested(leaves):
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
        st.frozensets(st.integers(), max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=3)),
        max_leaves=10)


anything = nested(scalar)
# Where a broker goes, a wrong value may hold the password (a tuple, a list, an object whose repr shows it).
broker_anything = nested(st.one_of(scalar, st.just(SECRET), st.builds(Secretive)))

url_part = st.one_of(st.text(max_size=12), st.sampled_from(['', '/', '#', '?', '@', ':', '%', '%zz', '[', ']',
                                                            '::1', '\x00', ' ', '\n']))
broker_url = st.one_of(
    st.builds(lambda scheme, user, host, port, vhost, query:
              f'{scheme}://{user}:{SECRET}@{host}{port}/{vhost}{query}',
              st.sampled_from(['amqp', 'amqps', 'http', '', 'AMQP', 'amqp:']), url_part, url_part,
              st.one_of(st.just(''), st.integers(-5, 99999).map(lambda p: f':{p}'), url_part.map(lambda p: f':{p}')),
              url_part, st.one_of(st.just(''), url_part.map(lambda q: f'?{q}'),
                                  st.just('?heartbeat=x'), st.just('?heartbeat=10&x=1'))),
    st.just(f'amqp://guest:{SECRET}@'), st.just(f'amqp://:{SECRET}@host:notaport/'),
    st.just(f'amqp://guest:{SECRET}@[::1/vhost'), st.just(f'amqp://user:{SECRET}'),
)
# The nodes of a cluster: a list of URLs (some fine, some broken, users and passwords that differ), or
# the dict form's 'hosts' (host:port entries, or a URL or user:password@host where a host belongs).
host_entry = st.one_of(url_part, st.just(f'carrot:{SECRET}@rabbit'), st.just(f'amqp://u:{SECRET}@r/'),
                       st.builds(lambda h, p: f'{h}:{p}', url_part, st.integers(-5, 99999)),
                       st.sampled_from(['rabbit1', 'rabbit2:5672', '[::1]:5673', 'r:0', '']))
fine_url = st.builds(lambda user, host, port: f'amqp://{user}:{SECRET}@{host}:{port}/vhost',
                     st.sampled_from(['carrot', 'other']), st.sampled_from(['r1', 'r2', 'r3']),
                     st.sampled_from([5672, 5673]))
broker_nodes = st.lists(st.one_of(fine_url, broker_url, broker_anything), max_size=4)
broker_dict = st.fixed_dictionaries({'password': st.one_of(st.just(SECRET), st.just(SECRET.encode()),
                                                           st.builds(Secretive))},
                                    optional={k: (st.one_of(st.lists(host_entry, max_size=4), anything)
                                                  if k == 'hosts' else st.one_of(broker_nodes, anything)
                                                  if k == 'url' else anything)
                                              for k in BROKER_KEYS if k != 'password'})
broker = st.one_of(broker_url, broker_nodes, broker_dict, broker_anything)
queue_type = st.one_of(st.sampled_from(['classic', 'quorum', 'stream', 'QUORUM', '']), anything)
queue = st.one_of(st.fixed_dictionaries({}, optional={k: (broker if k == 'host' else queue_type
                                                          if k == 'queue_type' else anything)
                                                      for k in QUEUE_KEYS}),
                  anything)
carrot_setting = st.one_of(
    anything,
    st.fixed_dictionaries({'default_broker': broker},
                          optional={**{k: anything for k in KEYS if k not in ('default_broker', 'queues')},
                                    'queue_type': queue_type,
                                    'queues': st.one_of(st.lists(queue, max_size=4), anything),
                                    'concurency': anything, '': anything, 'x' * 300: anything}),
)


def assert_clean(texts, where):
    for text in texts:
        assert isinstance(text, str), f'{where}: an error that is not text: {text!r}'
        for mark in SECRET_MARKS:
            assert mark not in text, f'{where}: the broker password leaked: {text!r}'


@settings(**HYPOTHESIS)
@given(raw=carrot_setting)
def test_the_parser_turns_any_setting_into_problems_never_a_traceback(raw):
    config, problems = parse_config(raw)
    assert isinstance(config, CarrotConfig)
    for problem in problems:
        assert CHECK_ID.match(problem.id), problem
    assert_clean([p.message for p in problems] + [str(p) for p in problems], 'parse_config')
    # What the rest of carrot shows of a config (logs, process titles, the monitor) is masked too.
    assert_clean([str(config.default_broker), repr(config.default_broker), repr(config)] +
                 [str(q.broker) for q in config.queues] + [repr(q) for q in config.queues], 'the config')


@pytest.mark.django_db
@settings(**HYPOTHESIS | {'max_examples': 60})
@given(raw=carrot_setting)
def test_the_system_check_reports_errors_never_a_traceback(raw):
    with override_settings(CARROT=raw):
        errors = check_carrot_setting()
    for error in errors:
        assert CHECK_ID.match(error.id or ''), error
    assert_clean([e.msg for e in errors] + [str(e) for e in errors], 'the system check')


@pytest.mark.parametrize('raw', [
    f'amqp://guest:{SECRET}@localhost:5672/',                          # CARROT itself a URL
    {'default_broker': f'amqp://guest:{SECRET}@localhost:notaport/'},
    {'default_broker': f'amqp://guest:{SECRET}@[::1/'},
    {'default_broker': f'amqp://guest:{SECRET}@localhost:5672/?x=1'},
    {'default_broker': f'http://guest:{SECRET}@localhost/'},
    {'default_broker': {'host': 'h', 'password': SECRET, 'port': 'five'}},
    {'default_broker': {'host': 'h', 'password': SECRET.encode()}},
    {'default_broker': {'host': 'h', 'password': 12345678}},
    {'default_broker': {'host': 'h', 'password': Secretive()}},
    {'default_broker': {'url': f'amqp://u:{SECRET}@h:1:2/'}},
    {'default_broker': [f'amqp://guest:{SECRET}@localhost/']},          # a node whose password needs encoding
    {'default_broker': [f'amqp://guest:{SECRET}%2F@a/', 'amqp://guest:other@b/']},  # nodes, other passwords
    {'default_broker': [f'amqp://guest:{SECRET}%2F@a/', f'amqp://guest:{SECRET}%2F@a/']},  # a node twice
    {'default_broker': [f'amqp://guest:{SECRET}%2F@a/', SECRET]},       # the password alone among the nodes
    {'default_broker': {'hosts': [f'carrot:{SECRET}@rabbit'], 'password': SECRET}},
    {'default_broker': {'hosts': f'rabbit,{SECRET}', 'password': SECRET}},
    {'default_broker': {'host': 'a', 'hosts': ['b'], 'password': SECRET}},
    {'queue_type': 'quorum', 'queues': [{'name': 'q', 'max_priority': 10, 'host': [f'amqp://u:{SECRET}@a/']}]},
    {'default_broker': (SECRET,)},
    {'default_broker': SECRET},                                         # the password alone, not a URL
    {'queues': [{'name': 'q', 'host': f'amqp://u:{SECRET}@:5672/'}]},
    {'queues': [{'name': 'q', 'host': {'password': SECRET, 'secure': 'yes'}}]},
    {'queues': f'amqp://guest:{SECRET}@localhost/'},
    {'max_attempts': Decimal('NaN'), 'claim_lease': math.nan, 'graceful_timeout': math.inf,
     'backoff_cap': -math.inf, 'max_message_size': 10 ** 400},
    {'queues': [{'name': Weird()}], 'task_modules': Weird()},
])
def test_pinned_bad_settings(raw):
    config, problems = parse_config(raw)
    assert problems, f'no problem reported for {raw!r:.200}'
    assert_clean([str(p) for p in problems], 'parse_config')


BAD_EXTRA = [
    f"CARROT = {{'default_broker': 'amqp://guest:{SECRET}@localhost:notaport/'}}",
    f"CARROT = {{'default_broker': {{'host': 'localhost', 'password': {SECRET!r}, 'port': 'x'}}}}",
    f"CARROT = {{'default_broker': ['amqp://guest:{SECRET}@localhost/']}}",
    f"CARROT = 'amqp://guest:{SECRET}@localhost/'",
    f"CARROT = {{'default_broker': {{'hosts': ['u:{SECRET}@localhost'], 'password': {SECRET!r}}}}}",
]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize('extra', BAD_EXTRA, ids=['bad-port', 'dict-bad-port', 'list', 'url-not-dict', 'hosts'])
def test_supervisor_check_on_a_bad_setting_exits_3_without_traceback_or_password(start_supervisor, extra):
    finished = start_supervisor.run('--check', extra=extra, timeout=90)
    text = finished.output + finished.log
    assert finished.returncode == 3, f'exit {finished.returncode}:\n{text[-3000:]}'
    assert 'Traceback' not in text, text[-3000:]
    assert_clean([text], 'carrot-supervisor --check')


def test_a_broker_dict_value_whose_repr_raises_is_a_problem_not_a_traceback():
    # Found by the generated run above: the broker dict's own messages quoted repr() of the value.
    config, problems = parse_config({'default_broker': {'host': Weird(), 'port': Weird()}})
    assert [p.id for p in problems] == ['carrot.E005', 'carrot.E005']
    assert all('<Weird object>' in p.message for p in problems), problems
