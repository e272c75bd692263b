"""A module outside every installed app and task module: carrot must never import it for a message."""
from carrot import task

IMPORTED = True


@task
def outside(x):
    return x
