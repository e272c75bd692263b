"""Hostile messages against a running carrot-supervisor (issue 6 §1, §2, §3; README "Delivery guarantees").

One supervisor (consumer of `default`, concurrency 1) runs for the whole module. Messages are published
with raw pika -- headers, properties and bodies of every shape an attacker or a broken publisher can put
on a queue -- and after each one a good message (a sentinel) is published behind it. The checks, per
message:

- the consumer child is the same process as before and the master runs (nothing killed it);
- the sentinel completes: the hostile message did not loop at the head of the queue;
- the hostile message ended COMPLETED, or FAILED with a readable reason and is in `default.dead`;
  nothing is left PUBLISHED or IN_PROGRESS, attempts stay at most 1;
- nothing the message named ran if it is not a task (a marker file proves it);
- no raw control character from message content reached the supervisor's log file.

Hypothesis generates the shapes; `@example`s pin the ones the issue names. Shrinking is off (each step
is a broker round trip): a failure prints the example as generated.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import time
import uuid

import pika
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from tests.conftest import raw_connection
from tests.harness import ROOT, Starter, assertion_failure, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.timeout(900)]

QUEUE = 'default'
DEAD = f'{QUEUE}.dead'
SENTINEL_TASK = 'tests.testapp.tasks.echo'
OUTCOME_TIMEOUT = 15  # seconds for a hostile message + its sentinel to settle (generous: shared machine)
POSTGRES = os.environ.get('CARROT_TEST_DB', 'sqlite') == 'postgres'

# Things that are not tasks and would leave a marker behind if run (tests/testapp/tasks.py, "attack").
NOT_TASKS = [
    ('os.system', lambda marker: [f'touch {marker}']),
    ('subprocess.call', lambda marker: [['touch', marker]]),
    ('builtins.open', lambda marker: [marker, 'w']),
    ('os.mkdir', lambda marker: [marker]),
    ('tests.testapp.tasks.os.mkdir', lambda marker: [marker]),
    ('tests.testapp.tasks.NotATask', lambda marker: [marker]),
    ('tests.testapp.tasks.callable_instance', lambda marker: [marker]),
    ('tests.testapp.tasks._private_touch', lambda marker: [marker]),
    ('tests.testapp.tasks._touch', lambda marker: [marker]),
    ('tests.testapp.tasks.make_dir', lambda marker: [marker]),
    ('tests.testapp.tasks._CallableThing.__call__', lambda marker: [marker, marker]),
    ('tests.testapp.tasks.NotATask.__init__', lambda marker: [marker, marker]),
]

# -- the module's supervisor ----------------------------------------------------------------------


class SupervisorHolder:
    """The module's supervisor. When an attack took it down (the master exited, or its consumer is
    gone), `ensure()` purges the queue and starts a fresh one, so each example is judged on its own."""

    def __init__(self, starter: Starter):
        self.starter = starter
        self.current = None
        self.restarts = 0
        self.dirty = False  # an attack failed: what it left in the queue must not judge the next one

    def ensure(self):
        sup = self.current
        if sup is not None and not self.dirty and sup.running() and consumer_pid(sup, wait=10):
            return sup
        self.dirty = False
        if sup is not None:
            sup.stop()
            self.restarts += 1
        _purge_queues()
        self.current = self.starter('--queues', QUEUE, name=f'supervisor{self.restarts + 1}')
        self.current.wait_ready([f'consumer {QUEUE}#1'], timeout=60)
        return self.current


@pytest.fixture(scope='module')
def holder(django_db_setup, django_db_blocker, tmp_path_factory):
    from django.db import connection
    with django_db_blocker.unblock():
        env = dict(os.environ)
        env['CARROT_TEST_DB_NAME'] = connection.settings_dict['NAME']
        env['DJANGO_SETTINGS_MODULE'] = 'tests.testproject.settings'
        env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
        _delete_queues()
        starter = Starter(env, tmp_path_factory.mktemp('hostile'))
        holder = SupervisorHolder(starter)
        try:
            holder.ensure()
            yield holder
        finally:
            starter.cleanup()


@pytest.fixture
def supervisor(holder):
    return holder.ensure()


@pytest.fixture(autouse=True)
def empty_queues():
    """Overrides the conftest fixture: the module's supervisor keeps its queues between tests."""
    yield


@pytest.fixture
def channel(supervisor):
    connection = raw_connection()
    ch = connection.channel()
    ch.confirm_delivery()
    yield ch
    if connection.is_open:
        connection.close()


def _purge_queues():
    connection = raw_connection()
    ch = connection.channel()
    for name in (QUEUE, DEAD):
        try:
            ch.queue_purge(name)
        except pika.exceptions.ChannelClosedByBroker:
            ch = connection.channel()
    connection.close()


def _delete_queues():
    connection = raw_connection()
    ch = connection.channel()
    ch.queue_delete(QUEUE)
    ch.queue_delete(DEAD)
    connection.close()


# -- publishing and observing ---------------------------------------------------------------------

def publish(channel, body: bytes, **properties) -> None:
    properties.setdefault('delivery_mode', 2)
    channel.basic_publish('', QUEUE, body, pika.BasicProperties(**properties), mandatory=True)


def sentinel_body() -> bytes:
    return json.dumps({'args': ['sentinel'], 'kwargs': {}}).encode()


def drain_dead(channel) -> list:
    found = []
    while True:
        method, properties, body = channel.basic_get(DEAD, auto_ack=True)
        if method is None:
            return found
        found.append((properties, body))


def consumer_pid(supervisor, wait=0.0) -> int | None:
    """The pid of the consumer child (waiting up to `wait` s for one that is idle)."""
    deadline = time.monotonic() + wait
    while True:
        kid = supervisor.by_slot().get(f'consumer {QUEUE}#1')
        if kid and kid.state.startswith('idle'):
            return kid.pid
        if time.monotonic() >= deadline:
            return kid.pid if kid else None
        time.sleep(0.1)


RAW_CONTROL = re.compile(r'[\x00-\x08\x0b-\x1f\x7f]')


class Attack:
    """Publish one hostile message and check everything the module docstring promises."""

    def __init__(self, holder, channel):
        self.holder = holder
        self.channel = channel

    def __call__(self, body: bytes, properties: dict, marker: str | None = None, row_optional=False,
                 expect='either'):
        try:
            rows, dead = self._attack(body, properties, marker, row_optional)
            if expect == 'dead':
                assert dead, f'expected FAILED + dead-lettered; rows: {[(r.status, r.exception) for r in rows]!r:.500}'
            elif expect == 'completed':
                assert not dead, f'expected COMPLETED, but it was dead-lettered: {[r.exception for r in rows]!r:.500}'
            return rows, dead
        except BaseException:
            self.holder.dirty = True
            raise

    def _attack(self, body, properties, marker, row_optional):
        from carrot.models import MessageLog
        sup = self.holder.ensure()
        before_pk = MessageLog.objects.order_by('-pk').values_list('pk', flat=True).first() or 0
        pid = consumer_pid(sup)
        assert pid, f'no consumer child before the attack{sup.tail()}'
        log_offset = len(sup.log())
        drain_dead(self.channel)

        publish(self.channel, body, **properties)
        sentinel_id = f'sentinel-{uuid.uuid4()}'
        publish(self.channel, sentinel_body(), message_id=sentinel_id, headers={'type': SENTINEL_TASK},
                content_type='application/json')

        def sentinel_done():
            if not sup.running():
                raise AssertionError(f'the master exited (code {sup.proc.returncode}){sup.tail()}')
            now = consumer_pid(sup)
            if now is not None and now != pid:
                raise AssertionError(f'the consumer child was replaced ({pid} -> {now}): the message '
                                     f'killed it{sup.tail(30)}')
            return MessageLog.objects.filter(uuid=sentinel_id, status=MessageLog.COMPLETED).exists()

        def stuck():
            rows = list(MessageLog.objects.filter(pk__gt=before_pk).values_list('uuid', 'status', 'attempts'))
            return f'the sentinel behind the hostile message to complete (the hostile one loops or ' \
                   f'killed the consumer); rows since: {rows!r:.2000}{sup.tail(30)}'

        wait_for(sentinel_done, OUTCOME_TIMEOUT, stuck, fail=assertion_failure)

        assert sup.running(), f'master exited{sup.tail()}'
        now_pid = consumer_pid(sup)
        assert now_pid == pid, f'the consumer child was replaced ({pid} -> {now_pid}): the message ' \
                               f'killed it{sup.tail()}'

        rows = [r for r in MessageLog.objects.filter(pk__gt=before_pk) if r.uuid != sentinel_id]
        dead = drain_dead(self.channel)
        # The consumer holds the sentinel already (prefetch): it may complete before RabbitMQ has routed the
        # rejected message to <queue>.dead. A FAILED row means a dead letter is on its way.
        deadline = time.monotonic() + 5
        while not dead and any(r.status == MessageLog.FAILED for r in rows) and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = drain_dead(self.channel)
        statuses = sorted(r.status for r in rows)
        assert len(dead) <= 1, f'{len(dead)} dead letters for one message'
        if dead:
            failed = [r for r in rows if r.status == MessageLog.FAILED]
            assert failed or row_optional, f'dead-lettered, but no FAILED row says why (rows: {statuses})'
            assert all(r.exception and r.exception.strip() for r in failed), \
                f'FAILED without a reason: {[r.exception for r in failed]}'
        elif not row_optional:
            assert statuses == [MessageLog.COMPLETED], \
                f'not dead-lettered, so it must have COMPLETED once; rows: {statuses} ' \
                f'{[(r.task, r.exception) for r in rows]!r:.1000}'
        assert not [r for r in rows if r.status in (MessageLog.PUBLISHED, MessageLog.IN_PROGRESS)], \
            f'rows left unfinished: {statuses}'
        assert all(r.attempts <= 1 for r in rows), f'attempts: {[r.attempts for r in rows]}'
        if marker is not None:
            assert not os.path.exists(marker), f'{properties.get("headers")} RAN: {marker} exists'

        from carrot.config import get_config
        cap = get_config().max_stored_text + 200  # room for the "cut" marker
        for row in rows:
            for name in ('output', 'exception', 'traceback', 'log'):  # the capped fields (issue 6 §1)
                value = getattr(row, name) or ''
                assert len(value) <= cap, f'{name} of the row stored {len(value)} characters ' \
                                          f'(CARROT max_stored_text is {cap - 200})'

        new_log = sup.log()[log_offset:]
        raw = RAW_CONTROL.search(new_log)
        assert raw is None, f'raw control character {raw.group()!r} from a message reached the log file: ' \
                            f'{new_log[max(0, raw.start() - 200):raw.start() + 100]!r}'
        return rows, dead


@pytest.fixture
def attack(holder, channel):
    return Attack(holder, channel)


# -- strategies -----------------------------------------------------------------------------------

HOSTILE_CHARS = ['\x00', '\n', '\r', '\x1b[31m', '\x1b]0;pwned\x07', '\u202e', '\ud7ff', '\t', '\x7f', "'",
                 '"', '\\', '%s', '{0}', '<script>']

hostile_text = st.lists(st.one_of(st.sampled_from(HOSTILE_CHARS), st.text(max_size=5)), max_size=12) \
    .map(''.join)
invalid_utf8 = st.binary(min_size=1, max_size=40).map(lambda b: b + b'\xff\xfe\xc3(')
long_text = st.integers(201, 5000).map(lambda n: 'tests.testapp.tasks.' + 'x' * n)

scalar = st.one_of(
    st.text(max_size=30), hostile_text, st.binary(max_size=30), invalid_utf8,
    st.integers(-2 ** 63, 2 ** 63 - 1), st.booleans(), st.none(),
    st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1)),
)
table_key = st.text(min_size=1, max_size=12).filter(lambda k: not k.startswith('x-'))
header_value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(table_key, inner, max_size=3)),
                            max_leaves=8)

registered = st.sampled_from(['tests.testapp.tasks.echo', 'tests.testapp.tasks.add',
                              'tests.testapp.tasks.explode', 'tests.testapp.tasks.returns_object',
                              'tests.testapp.tasks.chatty'])
type_header = st.one_of(registered, registered.map(lambda t: t + '\x00'),
                        registered.map(lambda t: '\x1b[2J' + t), hostile_text, invalid_utf8, long_text,
                        header_value)


def nested_table(depth: int) -> dict:
    table: dict = {'leaf': 'bottom'}
    for _ in range(depth):
        table = {'n': table}
    return table


def deep_json(depth: int, kind='list') -> bytes:
    if kind == 'list':
        return ('{"args": ' + '[' * depth + ']' * depth + ', "kwargs": {}}').encode()
    return ('{"args": [], "kwargs": ' + '{"a": ' * depth + '1' + '}' * depth + '}').encode()


json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10),
                                    st.floats(allow_nan=False, allow_infinity=False)),
                          lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                          max_leaves=12)

body = st.one_of(
    st.binary(max_size=200),
    invalid_utf8,
    json_value.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={'args': json_value, 'kwargs': json_value})
    .map(lambda v: json.dumps(v).encode()),
    st.builds(lambda args, kwargs: json.dumps({'args': args, 'kwargs': kwargs}).encode(),
              st.lists(json_value, max_size=4), st.dictionaries(st.text(max_size=8), json_value, max_size=3)),
    st.just(b''),
    st.just(b'{"args": [1, 2], "kwargs": {"c": 3}}'),   # wrong shape for add()
    st.just(b'{"args": [1, 2, 3, 4, 5, 6]}'),
)

message_id = st.one_of(st.none(), st.builds(lambda prefix: f'{prefix}{uuid.uuid4()}'[:255],
                                            hostile_text.map(lambda t: t[:150])),
                       st.builds(lambda raw: uuid.uuid4().hex.encode() + raw[:100], invalid_utf8))

properties = st.fixed_dictionaries(
    {'message_id': message_id},
    optional={
        'priority': st.integers(0, 255),
        'content_type': st.one_of(hostile_text.map(lambda t: t[:200]), st.just('application/json')),
        'content_encoding': hostile_text.map(lambda t: t[:200]),
        'correlation_id': hostile_text.map(lambda t: t[:200]),
        'reply_to': hostile_text.map(lambda t: t[:200]),
        'type': st.one_of(hostile_text.map(lambda t: t[:200]), invalid_utf8),
        'app_id': hostile_text.map(lambda t: t[:200]),
        'timestamp': st.integers(0, 2 ** 63 - 1),
        'delivery_mode': st.sampled_from([1, 2]),
    })


@st.composite
def headers(draw):
    """The headers table: maybe no `type`, maybe extra keys, maybe a table nested hundreds deep."""
    table = draw(st.dictionaries(table_key, header_value, max_size=4))
    if draw(st.booleans()):
        table['type'] = draw(type_header)
    else:
        table.pop('type', None)
    if draw(st.integers(0, 9)) == 0:
        table['deep'] = nested_table(draw(st.integers(100, 400)))
    return table


# -- the tests --------------------------------------------------------------------------------------

HYPOTHESIS = dict(deadline=None, database=None, max_examples=int(os.environ.get('CARROT_HOSTILE_EXAMPLES', 40)),
                  phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))


def _id():
    return str(uuid.uuid4())


ADD = {'type': 'tests.testapp.tasks.add'}
ECHO = {'type': 'tests.testapp.tasks.echo'}
EXPLODE = {'type': 'tests.testapp.tasks.explode'}
ARGS = b'{"args": [1, 2]}'

# The shapes issue 6 names, always tried, each on its own: (name, expected outcome, body, properties,
# headers). 'dead': FAILED + dead-lettered; 'completed': the task ran; 'either': both are acceptable.
PINNED = [
    ('nul-in-type', 'dead', ARGS, {'message_id': None}, {'type': 'tests.testapp.tasks.add\x00'}),
    ('nul-in-message-id', 'either', ARGS, {'message_id': f'nul\x00{_id()}'}, ADD),
    ('ansi-newline-in-type', 'dead', ARGS, {'message_id': _id()}, {'type': '\x1b[31mred\x1b[0m\nFAKE LOG LINE ERROR'}),
    ('invalid-utf8-type', 'dead', ARGS, {'message_id': _id()}, {'type': b'tests.testapp.tasks.add\xff\xfe'}),
    ('invalid-utf8-message-id', 'either', ARGS, {'message_id': _id().encode() + b'\xff\xfe'}, ADD),
    ('type-is-int', 'dead', ARGS, {'message_id': _id()}, {'type': 12345}),
    ('type-is-table', 'dead', ARGS, {'message_id': _id()}, {'type': {'nested': ['t']}}),
    ('type-longer-than-column', 'dead', ARGS, {'message_id': _id()}, {'type': 'tests.testapp.tasks.' + 'a' * 3000}),
    ('message-id-longer-than-column', 'either', ARGS, {'message_id': _id() + 'i' * 210}, ADD),
    ('no-type', 'dead', ARGS, {'message_id': _id()}, {}),
    ('no-type-no-id', 'dead', ARGS, {'message_id': None}, {}),
    ('no-headers-at-all', 'dead', ARGS, {'message_id': _id()}, None),
    ('json-5000-deep-list', 'dead', deep_json(5000), {'message_id': _id()}, ECHO),
    ('json-1000-deep-list', 'dead', deep_json(1000), {'message_id': None}, ECHO),
    ('json-5000-deep-dict', 'dead', deep_json(5000, 'dict'), {'message_id': _id()}, ECHO),
    ('header-table-400-deep', 'either', ARGS, {'message_id': _id()}, {**ADD, 'deep': nested_table(400)}),
    ('body-2MiB', 'dead', b'{"args": ["' + b'x' * (2 * 1024 * 1024) + b'"]}', {'message_id': _id()}, ECHO),
    ('body-not-utf8', 'dead', b'\xff\xfe\x00garbage', {'message_id': _id()}, ECHO),
    ('huge-exception', 'dead', b'{"args": ["' + b'y' * 200_000 + b'"]}', {'message_id': _id()}, EXPLODE),
    ('huge-output', 'completed', b'{"args": ["' + b'z' * 300_000 + b'"]}', {'message_id': _id()}, ECHO),
    ('nul-ansi-in-exception', 'dead', b'{"args": ["a\\u0000b\\u001b[31m"]}', {'message_id': _id()}, EXPLODE),
    ('nul-in-output', 'completed', b'{"args": ["a\\u0000b"]}', {'message_id': _id()}, ECHO),
    ('nul-in-kwargs-key', 'completed', b'{"args": [], "kwargs": {"\\u0000": 1}}', {'message_id': _id()}, ECHO),
    ('args-not-a-list', 'dead', b'{"args": {"a": 1}}', {'message_id': _id()}, ECHO),
    ('kwargs-not-a-dict', 'dead', b'{"kwargs": [1]}', {'message_id': _id()}, ECHO),
    ('wrong-arguments-for-add', 'dead', b'{"args": [1, 2, 3, 4, 5]}', {'message_id': _id()}, ADD),
    ('unknown-task', 'dead', ARGS, {'message_id': _id()}, {'type': 'tests.testapp.tasks.no_such_task'}),
    ('unknown-module', 'dead', ARGS, {'message_id': _id()}, {'type': 'no_such_module_xyz.run'}),
    ('hostile-properties', 'completed', ARGS, {'message_id': _id(), 'priority': 255, 'content_type': 'text/\x00plain',
                                  'type': '\x1b[2J', 'correlation_id': '\n\r', 'app_id': b'\xff'}, ADD),
]


@pytest.mark.parametrize('expect, body, properties, table', [p[1:] for p in PINNED], ids=[p[0] for p in PINNED])
def test_pinned_hostile_message(attack, expect, body, properties, table):
    properties = dict(properties)
    if table is not None:
        properties['headers'] = table
    attack(body, properties, expect=expect)


def test_generated_hostile_messages_end_completed_or_dead_lettered(attack):
    @settings(**HYPOTHESIS)
    @given(body=body, properties=properties, table=headers())
    def check(body, properties, table):
        properties = dict(properties)
        properties['headers'] = table
        if isinstance(properties.get('message_id'), str):
            properties['message_id'] = properties['message_id'][:255]
        attack(body, properties)

    check()


def test_a_message_naming_something_that_is_not_a_task_runs_nothing(attack, tmp_path):
    """os.system, a class, a callable instance, a _private helper, a wrapper built in tasks.py around
    an imported function, a method reached through a class: FAILED + dead-lettered, and it never ran."""
    ran = []
    for index, (path, arguments) in enumerate(NOT_TASKS):
        marker = str(tmp_path / f'ran-{index}')
        body = json.dumps({'args': arguments(marker), 'kwargs': {}}).encode()
        try:
            rows, dead = attack(body, {'message_id': str(uuid.uuid4()), 'headers': {'type': path}},
                                marker=None)
        except AssertionError as exc:
            ran.append(f'{path}: {exc}')
            continue
        if os.path.exists(marker):
            ran.append(f'{path}: RAN (the marker {marker} exists)')
        elif not dead:
            ran.append(f'{path}: not dead-lettered')
        else:
            exception = rows[0].exception if rows else ''
            if 'not registered' not in exception:
                ran.append(f'{path}: FAILED, but not as "not registered": {exception!r}')
    assert not ran, 'messages naming non-tasks:\n' + '\n'.join(ran)


def test_a_message_id_colliding_with_another_messages_row_neither_runs_nor_rewrites_it(attack, channel,
                                                                                     tmp_path):
    """§3: a queue writer cannot rewrite or suppress another message's log by reusing its id."""
    from carrot.models import MessageLog
    victim_id = str(uuid.uuid4())
    # The victim: a real message that completed.
    publish(channel, json.dumps({'args': ['victim'], 'kwargs': {}}).encode(), message_id=victim_id,
            headers={'type': 'tests.testapp.tasks.echo'})
    wait_for(lambda: MessageLog.objects.filter(uuid=victim_id, status=MessageLog.COMPLETED).exists(),
             OUTCOME_TIMEOUT, 'the victim to complete')
    victim = MessageLog.objects.get(uuid=victim_id)

    # The forger: same id, another task and other arguments.
    marker = str(tmp_path / 'forged-ran')
    body = json.dumps({'args': [marker, 'forged'], 'kwargs': {}}).encode()
    rows, dead = attack(body, {'message_id': victim_id, 'headers': {'type': 'tests.testapp.tasks.append_line'}},
                        row_optional=True)
    assert dead, 'the forged message was not dead-lettered'  # (acked silently, it would suppress evidence)
    assert not os.path.exists(marker), 'the forged message ran'
    after = MessageLog.objects.get(uuid=victim_id)
    assert (after.task, after.task_args, after.status, after.output) == \
        (victim.task, victim.task_args, victim.status, victim.output), 'the forged message rewrote the row'

    # The forger against a row still PUBLISHED (its real message not consumed yet): it must not run
    # in the real message's name, nor mark the real one COMPLETED/FAILED so the real one never runs.
    pending_id = str(uuid.uuid4())
    MessageLog.objects.create(uuid=pending_id, status=MessageLog.PUBLISHED, queue=QUEUE,
                              task='tests.testapp.tasks.echo', task_args='["real"]', content='{}')
    rows, dead = attack(body, {'message_id': pending_id, 'headers': {'type': 'tests.testapp.tasks.append_line'}},
                        row_optional=True)
    assert dead, 'the forged message was not dead-lettered' 
    assert not os.path.exists(marker), 'the forged message ran under a pending row'
    pending = MessageLog.objects.get(uuid=pending_id)
    assert (pending.task, pending.task_args) == ('tests.testapp.tasks.echo', '["real"]'), \
        f'the forged message rewrote the pending row: {pending.task} {pending.task_args}'
