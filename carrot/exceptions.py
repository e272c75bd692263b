"""Errors carrot raises, each named for what went wrong."""


class CarrotError(Exception):
    """Base class of every carrot error."""


class CarrotConfigException(CarrotError):
    """The CARROT setting is invalid, or names something that does not exist (the 1.x name)."""


CarrotConfigError = CarrotConfigException


class TaskNotRegistered(CarrotError):
    """A task was named that carrot is not allowed to run."""


class PublishError(CarrotError):
    """RabbitMQ did not take a message: it could not be reached, or refused or returned the message."""


class BrokerUnavailable(PublishError):
    """Transient: the broker could not be reached, or did not confirm in time. Trying later may work;
    with CARROT['store_and_forward'] the message waits in its log row and is relayed later."""


class MessageRejected(PublishError):
    """Permanent: the broker (or carrot) refused this message for good: unroutable, nacked, too large."""


class MessageTooLarge(MessageRejected):
    """The encoded message is larger than CARROT['max_message_size']."""


class QueueMismatchError(CarrotError):
    """A queue exists on the broker with arguments other than the ones carrot declares."""


class BadMessage(CarrotError):
    """A message from the queue cannot be turned into a task call; the text says why, for a person."""


class TaskTimeLimitExceeded(CarrotError):
    """A task ran past the time limit; its log says FAILED and its message was dead-lettered."""
