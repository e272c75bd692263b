"""A module of an installed app that nothing imports: its @carrot.task is found when a message names it."""
from carrot import task

IMPORTED = True


@task
def lazy(x):
    return x + 1


def plain(x):
    return x
