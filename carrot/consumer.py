"""The 1.x face of the consumer: ``carrot.consumer.Consumer`` is the default ``consumer_class`` and the
class 1.x code subclasses. It lives in carrot.consume.loop."""
from carrot.consume.loop import Consumer

__all__ = ['Consumer']
