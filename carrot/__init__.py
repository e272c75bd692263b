"""django-carrot: a task queue for Django on RabbitMQ, run by a prefork worker supervisor."""

__version__ = '2.0.0.dev0'

# The decorator is importable from the package root (`from carrot import task`). The registry
# module imports nothing from Django at module level, so this stays safe before apps are loaded.
from carrot.exceptions import Retry  # noqa: E402
from carrot.registry import task  # noqa: E402

__all__ = ['__version__', 'task', 'Retry']
