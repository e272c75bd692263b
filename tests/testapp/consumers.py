"""A consumer_class written as django-carrot 1.x's documentation showed (failure-callback example)."""
from carrot.consumer import Consumer

FAILURES = []


def failure_callback(log, exception):
    FAILURES.append((log.task, str(exception)))


class CustomConsumer(Consumer):
    def __init__(self, host, queue, logger, name, durable=True, queue_arguments=None,
                 exchange_arguments=None):
        super(CustomConsumer, self).__init__(host, queue, logger, name, durable, queue_arguments,
                                             exchange_arguments)
        self.add_failure_callback(failure_callback)


class BrokenConsumer(Consumer):
    """A consumer_class that cannot even start: its children die young, again and again."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError('BrokenConsumer cannot start (on purpose)')


class DiesBeforeParking(Consumer):
    """Dies, as a SIGKILL would, once: after a failed run was recorded for a retry (row SCHEDULED), before
    the retry's copy reaches the delay levels and the delivery is acked (tests/test_retries.py)."""

    def _settle(self, session, delivery):
        import os

        from carrot.amqp.disposition import Action
        marker = os.environ.get('CARROT_TEST_DIE_MARKER')
        if marker and not os.path.exists(marker) and delivery.future.result().action is Action.RETRY_LATER:
            open(marker, 'w').close()
            os._exit(17)
        super()._settle(session, delivery)
