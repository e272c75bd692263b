"""Callables of every shape in one module, for tests/test_registry.py: only `public` and the decorated
functions are tasks. The module is a task module only when a test lists it in CARROT['task_modules']."""
import functools
import subprocess
from os import system  # a builtin imported into a task module is not its task
from shlex import quote  # nor is a Python function imported into it

from carrot import task

CALLS = []
IMPORTED = (system, quote)  # not functions of this module: never tasks


def public(x):
    CALLS.append(x)
    return x


def _private():
    return 'private'


class Klass:
    pass


class _Callable:
    def __call__(self, *args):
        return 'called'


instance = _Callable()


def _wrap(func):
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


run = _wrap(subprocess.call)  # a wrapper around an imported function
call = functools.wraps(subprocess.call)(lambda *a: subprocess.call(*a))  # one that even looks like it
alias = public
builtin = len
lam = lambda: 1  # noqa: E731


def outer():
    def nested():
        return 'nested'
    return nested


nested = outer()


@task
def decorated(x):
    return x * 2


@task(name='shapes.renamed')
def _decorated_private(x):
    return x
