"""A private module of an installed app: carrot never imports it for a message (tests/test_registry.py)."""
from carrot import task

IMPORTED = True


@task
def hidden():
    return 'hidden'
