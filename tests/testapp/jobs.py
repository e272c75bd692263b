"""A module that is not a tasks module: only its decorated functions are tasks."""
from carrot import task


@task
def decorated_job(n):
    return n * 2


def undecorated_job(n):
    return n
