"""Queue types and brokers of several nodes, on the shared RabbitMQ. What needs a quorum queue to exist (tasks
through one, a nack, a node dying) runs on a cluster of its own: tests/test_cluster.py.

- declarations by type and role (carrot.amqp.declare);
- a queue that exists with another type: a clear error and carrot.E008, never a restart loop;
- a broker whose first node is dead: connections go to a node that answers, and say which did not;
- a consumer the broker cancels (its queue deleted) declares and consumes again;
- a message whose x-death header would crash RabbitMQ's dead-lettering is dead-lettered by carrot.
"""
import logging
import threading
import time

import pytest
from django.conf import settings
from django.test import override_settings

from carrot.amqp import connection as amqp_connection
from carrot.amqp.declare import Role, arguments_for, declarations
from carrot.checks import check_carrot_queues
from carrot.config import BrokerConfig, get_config, parse_config
from carrot.consumer import Consumer
from carrot.exceptions import QueueTypeMismatch
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import BROKER_HOST, BROKER_PORT, dead_letters, queue_depth, raw_connection, run_consumer
from tests.harness import wait_for
from tests.testapp import tasks

QUORUM_DEFAULT = {**settings.CARROT, 'queues': [{'name': 'default', 'queue_type': 'quorum'},
                                                 {'name': 'other'}]}
CLOSED_PORT = 1  # nothing listens on 127.0.0.1:1: a node that refuses at once


# -- declarations (no broker) ----------------------------------------------------------------------

@pytest.mark.no_broker
def test_arguments_by_type_and_role():
    assert arguments_for('classic', Role.MAIN, dead_letter_to='q.dead') == {
        'x-max-priority': 10, 'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': 'q.dead'}
    assert arguments_for('quorum', Role.MAIN, dead_letter_to='q.dead', delivery_limit=20) == {
        'x-queue-type': 'quorum', 'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': 'q.dead',
        'x-dead-letter-strategy': 'at-least-once', 'x-overflow': 'reject-publish', 'x-delivery-limit': 20}
    assert arguments_for('classic', Role.DEAD, message_ttl=1000) == {'x-message-ttl': 1000}
    assert arguments_for('quorum', Role.DEAD, message_ttl=1000) == {'x-queue-type': 'quorum',
                                                                    'x-message-ttl': 1000}
    # A parking queue (<queue>.wait, a delay level) sends what expires back, at least once on quorum.
    assert arguments_for('quorum', Role.PARKING, dead_letter_to='q', message_ttl=5000) == {
        'x-queue-type': 'quorum', 'x-message-ttl': 5000, 'x-dead-letter-exchange': '',
        'x-dead-letter-routing-key': 'q', 'x-dead-letter-strategy': 'at-least-once',
        'x-overflow': 'reject-publish'}
    assert arguments_for('classic', Role.PARKING, dead_letter_to='q') == {
        'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': 'q'}
    with pytest.raises(ValueError):
        arguments_for('stream', Role.MAIN)


@pytest.mark.no_broker
def test_a_configured_queue_is_two_queues_of_its_type_dead_letter_target_first():
    config, problems = parse_config({'queue_type': 'quorum', 'delivery_limit': 7,
                                     'queues': [{'name': 'q'}, {'name': 'c', 'queue_type': 'classic'}]})
    assert problems == []
    quorum, classic = config.queue('q'), config.queue('c')
    assert (quorum.queue_type, quorum.delivery_limit, classic.queue_type, classic.delivery_limit) == \
        ('quorum', 7, 'classic', None)
    assert config.queue('default').queue_type == 'quorum'  # the implicit default queue follows CARROT
    found = declarations(quorum, dead_letter_ttl_days=1)
    assert [(d.name, d.role, d.queue_type) for d in found] == [
        ('q.dead', Role.DEAD, 'quorum'), ('q', Role.MAIN, 'quorum')]  # parking: the delay levels
    assert found[0].arguments['x-message-ttl'] == 86400 * 1000 and found[1].arguments['x-delivery-limit'] == 7
    assert all('x-max-priority' not in d.arguments for d in found)
    assert declarations(classic, None)[1].arguments['x-max-priority'] == 10


# -- a queue of another type ------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_classic_queue_named_as_quorum_is_a_clear_error_and_a_check_error(caplog):
    publish_message(tasks.add, 1, 1)  # declares 'default' as the test settings say: classic
    with override_settings(CARROT=QUORUM_DEFAULT):
        with pytest.raises(QueueTypeMismatch) as caught:
            publish_message(tasks.add, 2, 2)
        text = str(caught.value)
        assert "queue 'default.dead'" in text or "queue 'default'" in text
        assert 'is a classic queue, and CARROT declares it as a quorum queue' in text
        assert 'RabbitMQ cannot change the type of a queue' in text
        assert 'give the quorum queue a new name' in text and 'drain and delete it' in text
        assert f'rabbitmqctl delete_queue -p {settings.VHOST}' in text
        assert MessageLog.objects.get(task__endswith='add', task_args='[2, 2]').status == 'FAILED'

        errors = check_carrot_queues()
        assert [e.id for e in errors] == ['carrot.E008']
        assert 'RabbitMQ cannot change the type of a queue' in errors[0].msg

        # A bounded run (a script, a test) is told at once ...
        with pytest.raises(QueueTypeMismatch):
            run_consumer(idle_timeout=1)
        # ... a worker waits and says so, instead of dying and being restarted in a loop.
        consumer = Consumer(None, 'default', logging.getLogger('carrot.consumer'), 'default#clash')
        failure = []
        thread = threading.Thread(target=lambda: _run_catching(consumer, failure))
        caplog.set_level(logging.INFO, logger='carrot')
        thread.start()
        try:
            wait_for(lambda: 'cannot consume default' in caplog.text, 15, 'the clash in the log')
            time.sleep(1)
            assert thread.is_alive() and not failure
        finally:
            consumer.stop()
            thread.join(15)
        assert not thread.is_alive() and not failure, failure
        assert caplog.text.count('cannot consume default') == 1
        assert 'this worker waits and tries again' in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_queue_left_by_django_carrot_1_named_as_quorum_is_a_type_error_too(raw_channel):
    raw_channel.queue_declare('default', durable=True, arguments={'x-max-priority': 255})  # as 1.x did
    with override_settings(CARROT=QUORUM_DEFAULT):
        with pytest.raises(QueueTypeMismatch) as caught:
            publish_message(tasks.add, 1, 1)
    assert "queue 'default' on" in str(caught.value) and 'is a classic queue' in str(caught.value)
    assert (caught.value.existing, caught.value.wanted) == ('classic', 'quorum')


def _run_catching(consumer, failure):
    try:
        consumer.run()
    except BaseException as exc:
        failure.append(exc)


@pytest.mark.django_db(transaction=True)
def test_other_arguments_on_the_broker_are_carrot_E009(raw_channel):
    publish_message(tasks.add, 1, 1)  # default.dead with a 14-day TTL
    with override_settings(CARROT={**settings.CARROT, 'dead_letter_ttl_days': 2}):
        errors = check_carrot_queues()
    assert [e.id for e in errors] == ['carrot.E009']
    assert "queue 'default.dead'" in errors[0].msg and 'x-message-ttl' in errors[0].msg
    assert check_carrot_queues() == []  # as declared: nothing to say; queues not declared yet are skipped


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_carrot_supervisor_refuses_to_start_on_a_queue_type_clash(start_supervisor):
    publish_message(tasks.add, 1, 1)
    extra = "CARROT = {**CARROT, 'queue_type': 'quorum'}\n"
    finished = start_supervisor.run('--check', extra=extra, timeout=90)
    assert finished.returncode == 3, finished.output
    assert 'carrot.E008' in finished.output and 'RabbitMQ cannot change the type' in finished.output
    assert 'Traceback' not in finished.output + finished.log


# -- several nodes --------------------------------------------------------------------------------

def two_node_broker(first_port=CLOSED_PORT) -> BrokerConfig:
    """The shared RabbitMQ as the second node of a 'cluster' whose first node refuses connections."""
    return BrokerConfig(BROKER_HOST, first_port, settings.VHOST, 'guest', 'guest',
                        other_nodes=((BROKER_HOST, BROKER_PORT),))


def test_connect_goes_to_a_node_that_answers_and_tries_a_failed_one_last(caplog):
    broker = two_node_broker()
    caplog.set_level(logging.INFO, logger='carrot.broker')
    amqp_connection._nodes.forget()
    amqp_connection._nodes.preferred[broker] = (BROKER_HOST, CLOSED_PORT)  # as if chosen at random
    connection = amqp_connection.connect(broker)
    try:
        assert amqp_connection.node_of(connection) == (BROKER_HOST, BROKER_PORT)
        assert f'connected to node {BROKER_HOST}:{BROKER_PORT}' in caplog.text
        assert f'{BROKER_HOST}:{CLOSED_PORT} did not answer (connection refused' in caplog.text
        # Now the node that answered comes first, the one that refused last.
        assert amqp_connection._nodes.order(broker) == [(BROKER_HOST, BROKER_PORT), (BROKER_HOST, CLOSED_PORT)]
        amqp_connection.connection_lost(connection)  # its node went away: the others first
        assert amqp_connection._nodes.order(broker)[0] == (BROKER_HOST, CLOSED_PORT)
    finally:
        connection.close()
        amqp_connection._nodes.forget()


@pytest.mark.no_broker
def test_processes_start_at_different_nodes():
    broker = BrokerConfig('r1', 5672, other_nodes=(('r2', 5672), ('r3', 5672)))
    firsts = set()
    for _ in range(60):
        amqp_connection._nodes.forget()  # what a forked child does
        firsts.add(amqp_connection._nodes.order(broker)[0])
    amqp_connection._nodes.forget()
    assert firsts == set(broker.nodes)


def test_no_node_answering_names_each_node_and_never_the_password():
    broker = BrokerConfig(BROKER_HOST, CLOSED_PORT, settings.VHOST, 'guest', 's3cret',
                          other_nodes=((BROKER_HOST, 2),))
    with pytest.raises(amqp_connection.NoNodeAnswered) as caught:
        amqp_connection.connect(broker)
    text = amqp_connection.describe_connection_error(caught.value, broker)
    assert text.startswith('no node answered: ')
    assert f'connection refused at {BROKER_HOST}:{CLOSED_PORT}' in text and f'{BROKER_HOST}:2' in text
    assert 's3cret' not in text + str(broker) + repr(broker)
    assert str(broker) == f'amqp://guest:***@{BROKER_HOST}:{CLOSED_PORT},{BROKER_HOST}:2/{settings.VHOST}'


@pytest.mark.no_broker
def test_a_connection_lost_during_the_login_is_not_called_a_wrong_password():
    """pika raises a "probable" authentication (or access) error for any connection lost while logging in;
    only RabbitMQ's own refusal (a close with 403 or 530) means the credentials or the vhost are wrong."""
    import pika.exceptions as pe
    broker = BrokerConfig(BROKER_HOST, BROKER_PORT, 'v', 'guest', 's3cret')
    for kind in (pe.ProbableAuthenticationError, pe.ProbableAccessDeniedError):
        lost = kind("StreamLostError: ('Stream connection lost: RequestTimeout()',)")
        text = amqp_connection.describe_connection_error(lost, broker)
        assert text == (f"the connection to {BROKER_HOST}:{BROKER_PORT} was lost while logging in as 'guest' on "
                        "vhost 'v' (StreamLostError: ('Stream connection lost: RequestTimeout()',)); RabbitMQ "
                        "did not refuse the login"), text
    refused = pe.ProbableAuthenticationError("ConnectionClosedByBroker: (403) 'ACCESS_REFUSED - Login was refused'")
    assert amqp_connection.describe_connection_error(refused, broker).endswith('the user name or password is wrong')


@pytest.mark.django_db(transaction=True)
def test_publishing_consuming_and_the_monitor_use_whichever_node_answers():
    from carrot.monitor.broker_stats import forget, queue_stats
    nodes = [f'amqp://guest:guest@{BROKER_HOST}:{CLOSED_PORT}/{settings.VHOST}',
             f'amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{settings.VHOST}']
    with override_settings(CARROT={**settings.CARROT, 'default_broker': nodes}):
        broker = get_config().default_broker
        assert broker.nodes == ((BROKER_HOST, CLOSED_PORT), (BROKER_HOST, BROKER_PORT))
        logs = [publish_message(tasks.add, i, i) for i in range(3)]
        assert [log.status for log in logs] == ['PUBLISHED'] * 3
        forget()
        stats = queue_stats([get_config().queue('default')])['default']
        assert (stats.state, stats.ready) == ('ok', 3)
        run_consumer(max_messages=3)
        assert set(MessageLog.objects.filter(pk__in=[log.pk for log in logs]).values_list('status', flat=True)) \
            == {'COMPLETED'}


# -- a consumer the broker cancels ------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_consumer_whose_queue_is_deleted_declares_it_again_and_goes_on(caplog):
    caplog.set_level(logging.INFO, logger='carrot')
    consumer = Consumer(None, 'default', logging.getLogger('carrot.consumer'), 'default#cancel')
    failure = []
    thread = threading.Thread(target=lambda: _run_catching(consumer, failure))
    thread.start()
    try:
        wait_for(lambda: 'consuming default' in caplog.text, 15, 'the consumer to start')
        connection = raw_connection()
        connection.channel().queue_delete('default')  # RabbitMQ cancels the consumer (basic.cancel)
        connection.close()
        wait_for(lambda: 'cancelled the consumer' in caplog.text, 15, 'the cancel to be noticed')
        wait_for(lambda: caplog.text.count('consuming default') >= 2, 15, 'the consumer to consume again')
        log = publish_message(tasks.add, 4, 4)
        wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', 15, 'the task to run')
    finally:
        consumer.stop()
        thread.join(15)
    assert not failure, failure


@pytest.mark.no_broker
def test_a_queue_type_setting_that_rabbitmq_does_not_have_is_a_check_error():
    problems = [str(p) for p in parse_config({'queue_type': 'lazy', 'delivery_limit': 0})[1]]
    assert "carrot.E003: CARROT['queue_type'] must be 'classic' or 'quorum', got 'lazy'" in problems
    assert "carrot.E003: CARROT['delivery_limit'] must be a positive integer or None, got 0" in problems


@pytest.mark.no_broker
def test_the_nodes_of_a_broker_in_both_spellings():
    as_list, problems = parse_config({'default_broker': ['amqp://app:pw@rabbit1:5672/app',
                                                         'amqp://app:pw@rabbit2:5673/app']})
    assert problems == []
    as_dict, problems = parse_config({'default_broker': {'hosts': ['rabbit1:5672', 'rabbit2:5673'], 'name': 'app',
                                                         'username': 'app', 'password': 'pw'}})
    assert problems == []
    assert as_list.default_broker == as_dict.default_broker
    assert as_list.default_broker.nodes == (('rabbit1', 5672), ('rabbit2', 5673))
    assert str(as_list.default_broker) == 'amqp://app:***@rabbit1:5672,rabbit2:5673/app'
    queue = parse_config({'queues': [{'name': 'q', 'host': {'hosts': ['a', 'b'], 'secure': True}}]})[0].queue('q')
    assert queue.broker.nodes == (('a', 5671), ('b', 5671))


# -- an x-death that would crash RabbitMQ -----------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_message_whose_x_death_would_crash_rabbitmq_is_dead_lettered_by_carrot(raw_channel):
    # RabbitMQ 3.10 crashes the queue (a quorum queue's state machine, a classic queue's process, losing
    # the message) when it dead-letters a message whose x-death array holds something else than tables.
    from tests.test_consumer import raw_publish
    import json
    message_id = raw_publish(raw_channel, {'args': ['no'], 'kwargs': {}},
                             headers={'type': 'tests.testapp.tasks.explode', 'x-death': ['a', {'count': 'x'}]})
    run_consumer(max_messages=1)
    assert MessageLog.objects.get(uuid=message_id).status == 'FAILED'
    wait_for(lambda: queue_depth('default.dead') == 1, 10, 'the message in default.dead')
    [(properties, body)] = dead_letters(raw_channel)
    assert properties.message_id == message_id and json.loads(body) == {'args': ['no'], 'kwargs': {}}
    assert 'x-death' not in properties.headers
    assert properties.headers['x-carrot-unusable-x-death'] == "['a', {'count': 'x'}]"
    # The queue lives on.
    log = publish_message(tasks.add, 1, 2)
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert log.status == 'COMPLETED'


@pytest.mark.no_broker
def test_which_x_death_headers_rabbitmq_cannot_dead_letter():
    from pika.compat import long as pika_long

    from carrot.amqp.wire import x_death_crashes_rabbitmq as crashes
    assert not any(crashes(h) for h in (None, {}, {'x-death': 'text'}, {'x-death': {'a': 1}}, {'x-death': []},
                                        {'x-death': [{'queue': 'q', 'reason': 'rejected', 'count': 2}]},
                                        {'x-death': [{'queue': 5}]},
                                        # a count as pika decodes RabbitMQ's own: its 64-bit long
                                        {'x-death': [{'queue': 'q', 'reason': 'expired', 'count': pika_long(1)}]}))
    assert all(crashes({'x-death': bad}) for bad in (['a'], [[1]], [{'count': 'x'}], [{'count': 1.5}],
                                                    [{'count': True}], [{'count': 1}, 7]))


# -- adopting queues declared before (1.x, or carrot with x-max-priority 255) ------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_queue_of_django_carrot_1_is_adopted_and_its_failures_still_reach_the_dead_letter_queue(raw_channel):
    raw_channel.queue_declare('default', durable=True, arguments={'x-max-priority': 255})  # as 1.x did
    publish_message(tasks.add, 1, 2)
    publish_message(tasks.explode, 'kept')
    run_consumer(max_messages=2)
    assert set(MessageLog.objects.values_list('status', flat=True)) == {'COMPLETED', 'FAILED'}
    bodies = dead_letters(raw_channel)  # no dead-letter route on the queue: the consumer moved it by hand
    assert len(bodies) == 1 and b'kept' in bodies[0][1]
    assert check_carrot_queues() == []  # nothing to report: adopted as it is


@pytest.mark.django_db(transaction=True)
def test_a_carrot_queue_declared_with_255_levels_is_adopted_with_its_priority(raw_channel):
    old = declarations(get_config().queue('default'))
    for declaration in old:
        arguments = dict(declaration.arguments)
        if declaration.role is Role.MAIN:
            arguments['x-max-priority'] = 255
        raw_channel.queue_declare(declaration.name, durable=True, arguments=arguments)
    publish_message(tasks.explode, 'routed')
    run_consumer(max_messages=1)
    bodies = dead_letters(raw_channel)  # the queue's own dead-letter route
    assert len(bodies) == 1 and b'routed' in bodies[0][1]


@pytest.mark.django_db(transaction=True)
def test_a_priority_named_in_carrot_is_not_adopted_away(raw_channel):
    raw_channel.queue_declare('default', durable=True, arguments={'x-max-priority': 255})
    named = {**settings.CARROT, 'queues': [{'name': 'default', 'max_priority': 10}]}
    with override_settings(CARROT=named):
        errors = check_carrot_queues()
    assert [e.id for e in errors] == ['carrot.E009'] and 'x-' in errors[0].msg
