"""Errors carrot raises, each named for what went wrong.

    CarrotError
     ├─ CarrotConfigException (CarrotConfigError)   the CARROT setting is invalid
     │   ├─ UnknownQueue (also InvalidCall)          a queue name CARROT['queues'] does not have
     │   └─ NotMigrated                              carrot's tables are missing: run manage.py migrate
     ├─ InvalidCall (also ValueError)                 a task call carrot refuses before anything is written
     │   ├─ NotSerialisable (also TypeError)         an argument JSON cannot carry
     │   ├─ InvalidArguments                         stored arguments that cannot be read back
     │   ├─ InvalidSchedule                          an interval or schedule that cannot run
     │   └─ TaskNotRegistered                        a task carrot may not run (the allowlist)
     ├─ PublishError                                 RabbitMQ did not take a message
     │   ├─ BrokerUnavailable                        transient: try later (store-and-forward does)
     │   └─ MessageRejected                          permanent: refused for good
     │       ├─ MessageTooLarge
     │       └─ QueueMismatchError                   a queue exists with other arguments than carrot's
     │           └─ QueueTypeMismatch                ... of another type (classic / quorum)
     ├─ BadMessage                                   a delivery that cannot be turned into a task call
     ├─ TaskTimeLimitExceeded
     └─ WorkerLost                                   the worker running a task died or lost its connection
    Retry                                           raised by a task: run me again later (not an error)

`InvalidCall` is also a ValueError (and `NotSerialisable` a TypeError), so code written to catch the
built-in types keeps working. `carrot.publish.outbox.UNSENDABLE` is the one tuple of "this message can
never be sent".
"""


class CarrotError(Exception):
    """Base class of every carrot error."""


class CarrotConfigException(CarrotError):
    """The CARROT setting is invalid, or names something that does not exist (the 1.x name)."""


CarrotConfigError = CarrotConfigException


class InvalidCall(CarrotError, ValueError):
    """A task call that carrot refuses before anything is written or sent; the text says why."""


class NotSerialisable(InvalidCall, TypeError):
    """An argument of a task call that JSON cannot carry."""


class InvalidArguments(InvalidCall):
    """Stored task arguments (a log row's, a schedule's) that cannot be read back. `field` names the
    column: 'task_args' (positional) or 'content' (keyword arguments)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidSchedule(InvalidCall):
    """A schedule's interval (or last run time) that the scheduler cannot run."""


class TaskNotRegistered(InvalidCall):
    """A task was named that carrot is not allowed to run."""


class UnknownQueue(CarrotConfigException, InvalidCall):
    """A queue name that is not in CARROT['queues']."""


class NotMigrated(CarrotConfigException):
    """carrot's tables (or columns) are missing from the database: run manage.py migrate."""


class PublishError(CarrotError):
    """RabbitMQ did not take a message: it could not be reached, or refused or returned the message."""


class BrokerUnavailable(PublishError):
    """Transient: the broker could not be reached, did not confirm in time, or nacked the message (a quorum
    queue that has lost its quorum, or is full under reject-publish). Trying later may work; with
    CARROT['store_and_forward'] the message waits in its log row and is relayed later."""


class MessageRejected(PublishError):
    """Permanent: the broker (or carrot) refused this message for good: unroutable, no such exchange, too
    large, a queue clash."""


class MessageTooLarge(MessageRejected):
    """The encoded message is larger than CARROT['max_message_size']."""


class QueueMismatchError(MessageRejected):
    """A queue exists on the broker with arguments other than the ones carrot declares. `queue` names it."""

    def __init__(self, message: str, queue: str | None = None):
        super().__init__(message)
        self.queue = queue


class QueueTypeMismatch(QueueMismatchError):
    """A queue exists on the broker as another type (`existing`: 'classic', 'quorum', ...) than CARROT
    names (`wanted`); RabbitMQ cannot change it. The text says how to move the queue."""

    def __init__(self, message: str, queue: str | None = None, existing: str | None = None,
                 wanted: str | None = None):
        super().__init__(message, queue)
        self.existing = existing
        self.wanted = wanted


class BadMessage(CarrotError):
    """A message from the queue cannot be turned into a task call; the text says why, for a person."""


class TaskTimeLimitExceeded(CarrotError):
    """A task ran past the time limit; its log says FAILED and its message was dead-lettered."""


class AlreadyRequeued(CarrotError):
    """A requeue found its row gone or changed: another requeue (or a delete) got there first."""


class StillRunning(CarrotError):
    """A requeue of a task that is running (IN_PROGRESS): it can be requeued once it has finished."""


class WorkerLost(CarrotError):
    """The worker running a task died or lost its connection (an attempt's error; see max_attempts)."""


class Retry(Exception):
    """Raised by a task to be run again later: ``raise carrot.Retry(delay=30)``.

    The attempt is recorded and the task runs again after `delay` seconds (None: the task's backoff),
    counted in the row's retries, up to the task's ``max_retries`` (3 when it sets none). Past that the
    task is FAILED like any other failure. `reason` is shown with the attempt.
    """

    def __init__(self, reason: str = '', *, delay: float | None = None):
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))
                                  or not 0 <= delay < float('inf')):
            raise TypeError(f'Retry(delay=...) takes a number of seconds >= 0, got {delay!r}')
        super().__init__(reason or (f'retry in {delay:g}s' if delay is not None else 'retry requested'))
        self.delay = delay
