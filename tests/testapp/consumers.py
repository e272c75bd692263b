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
