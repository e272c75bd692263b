"""The fast layer: the rules carrot applies before anything touches a broker or a database -- how task
arguments are stored and read back, what makes a schedule runnable, what a refused call raises, and the
pika adaptations. No RabbitMQ, no database rows."""
import json
import types

import pika.data
import pytest
from hypothesis import given, settings, strategies as st

from carrot.amqp import pika_compat, wire
from carrot.exceptions import (CarrotConfigException, CarrotError, InvalidArguments, InvalidCall, InvalidSchedule,
                               MessageRejected, MessageTooLarge, NotSerialisable, PublishError, QueueMismatchError,
                               TaskNotRegistered, UnknownQueue)
from carrot.publish import arguments
from carrot.publish.outbox import UNSENDABLE
from carrot.publish.outgoing import prepare
from carrot.schedule import rules
from tests.testapp import tasks

pytestmark = pytest.mark.no_broker
ADD = 'tests.testapp.tasks.add'

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


# -- stored arguments ------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(args=st.lists(json_values, max_size=5), kwargs=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_what_is_dumped_reads_back_the_same_for_log_rows_and_schedules(args, kwargs):
    task_args, content = arguments.dump(args, kwargs)
    assert arguments.load_logged(task_args, content) == (tuple(args), kwargs)
    if len(task_args) <= arguments.MAX_TEXT and len(content) <= arguments.MAX_TEXT \
            and wire.nesting_depth(args) <= arguments.MAX_DEPTH and wire.nesting_depth(kwargs) <= arguments.MAX_DEPTH:
        assert arguments.load_scheduled(task_args, content) == (tuple(args), kwargs)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_stored_text_reads_back_or_says_which_field_is_wrong(text):
    for load in (arguments.load_logged, arguments.load_scheduled):
        for task_args, content in ((text, '{}'), ('[]', text)):
            try:
                args, kwargs = load(task_args, content)
            except InvalidArguments as exc:
                assert exc.field in ('task_args', 'content') and str(exc)
                assert isinstance(exc, ValueError)  # what callers written for the built-ins catch
            else:
                assert isinstance(args, tuple) and isinstance(kwargs, dict)


def test_what_django_carrot_1x_stored_is_still_read():
    assert arguments.load_logged("(1, 'a')", '') == ((1, 'a'), {})           # a log row: a tuple's repr
    assert arguments.load_scheduled('a, b ,c', '') == (('a', 'b', 'c'), {})  # a schedule: "a, b, c"
    assert arguments.load_logged_leniently('not readable', '[1]') == ((), {})


def test_a_schedules_arguments_are_held_to_the_same_limits_everywhere():
    deep = '[' * 40 + ']' * 40
    assert 'nested too deeply (at most 32 levels)' in arguments.scheduled_problems(deep, '')['task_args']
    long = json.dumps(['x' * (arguments.MAX_TEXT + 1)])
    assert 'too long' in arguments.scheduled_problems(long, '')['task_args']
    assert set(arguments.scheduled_problems('[1,', '[1]')) == {'task_args', 'content'}
    assert arguments.scheduled_problems('(1, 2)', '')  # reads as a mistaken tuple, not as "a, b" text


# -- schedule rules ---------------------------------------------------------------------------------

def schedule(**fields):
    values = dict(task=ADD, task_args='[1, 2]', content='{}', interval_type='minutes', interval_count=5,
                  queue='default', last_run_time=None)
    values.update(fields)
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize('unit, count, problem', [
    ('seconds', 1, None), ('days', 3650, None),
    ('days', 3651, 'at most 3650 days'), ('seconds', 0, 'at least 1 (got 0)'), ('hours', -1, 'at least 1'),
    ('hours', 1.5, 'whole number'), ('hours', True, 'whole number'), ('weeks', 1, "'weeks' is not one of"),
])
def test_interval_rules(unit, count, problem):
    found = rules.interval_problem(unit, count)
    assert (found is None) if problem is None else (problem in found), found


def test_a_good_schedule_has_no_problem_and_each_bad_field_is_named_once():
    assert rules.schedule_problems(schedule()) == {}
    problems = rules.schedule_problems(schedule(task='os.system', content='[1]', interval_count=0, queue='nope'))
    assert set(problems) == {'task', 'content', 'interval_count', 'queue'}, problems


def test_arguments_must_fit_the_tasks_signature():
    assert 'too many positional arguments' in rules.schedule_problems(schedule(task_args='[1, 2, 3]'))['task_args']
    assert "unexpected keyword argument 'c'" in rules.schedule_problems(schedule(content='{"c": 1}'))['task_args']
    with pytest.raises(InvalidArguments):
        rules.check_schedule(schedule(task_args='[1]'))


def test_check_schedule_raises_the_carrot_error_of_the_first_problem():
    for fields, error in ((dict(task='os.system'), TaskNotRegistered), (dict(task_args='[1,'), InvalidArguments),
                          (dict(interval_type='weeks'), InvalidSchedule), (dict(queue='nope'), UnknownQueue)):
        with pytest.raises(error):
            rules.check_schedule(schedule(**fields))


# -- one error vocabulary ---------------------------------------------------------------------------

@pytest.mark.parametrize('call, error, builtin', [
    (lambda: prepare(ADD, (object(), 1)), NotSerialisable, TypeError),
    (lambda: prepare(ADD, (1, 2), priority=256), InvalidCall, ValueError),
    (lambda: prepare(ADD, (1, 2, 3)), InvalidCall, ValueError),
    (lambda: prepare(ADD, (1, 2), queue='nope'), UnknownQueue, CarrotConfigException),
    (lambda: prepare('os.system', ('true',)), TaskNotRegistered, ValueError),
    (lambda: prepare(tasks.echo, ('x' * 2_000_000,)), MessageTooLarge, MessageRejected),
])
def test_what_prepare_refuses_is_a_carrot_error_and_the_builtin_callers_catch(call, error, builtin):
    with pytest.raises(error) as caught:
        call()
    assert isinstance(caught.value, builtin) and isinstance(caught.value, CarrotError)
    assert isinstance(caught.value, UNSENDABLE)


def test_the_permanent_refusals_are_one_family():
    assert issubclass(QueueMismatchError, MessageRejected) and issubclass(MessageRejected, PublishError)
    assert issubclass(MessageTooLarge, MessageRejected)


# -- pika adaptations -------------------------------------------------------------------------------

def nested_table(depth: int) -> bytes:
    """An AMQP field table holding a table holding a table ... `depth` levels, encoded by pika itself."""
    value = {'x': 1}
    for _ in range(depth):
        value = {'t': value}
    pieces = []
    pika.data.encode_table(pieces, value)
    return b''.join(pieces)


def test_the_header_decoder_is_depth_bounded_once_installed():
    """Fails loudly if a pika upgrade stops resolving decode_value through pika.data's module global (the
    one thing the bound relies on): a 400-deep table would then raise RecursionError in the frame reader."""
    pika_compat.install()
    decoded, _ = pika.data.decode_table(nested_table(400), 0)
    depth = 0
    while isinstance(decoded, dict) and 't' in decoded:
        decoded, depth = decoded['t'], depth + 1
    assert isinstance(decoded, wire.NestedTooDeep)
    assert pika_compat.MAX_HEADER_DEPTH <= depth <= pika_compat.MAX_HEADER_DEPTH + 1, depth
    shallow, _ = pika.data.decode_table(nested_table(3), 0)
    assert shallow == {'t': {'t': {'t': {'x': 1}}}}


def test_install_is_idempotent():
    pika_compat.install()
    decoder = pika.data.decode_value
    pika_compat.install()
    assert pika.data.decode_value is decoder
