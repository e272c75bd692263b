"""The retry policy: whether a failed run of a task is tried again, and after how long.

A task's policy comes from its own options -- ``@carrot.task(max_retries=..., retry_backoff=...,
retry_backoff_max=..., retry_on=...)``, or the same attributes of a ``django.tasks`` Task made by
carrot's backend -- and, for what it does not set, from CARROT (``max_retries`` 0: no retries, as 1.x).

- A run that raises one of ``retry_on`` (Exception by default) is retried while fewer than
  ``max_retries`` retries were made. The n-th retry waits ``retry_backoff * 2**(n-1)`` seconds plus up
  to 20% jitter, at most ``retry_backoff_max``; a callable ``retry_backoff(exception, n)`` gives the
  seconds itself, or None to stop retrying.
- A task that raises ``carrot.Retry(delay=...)`` asks for a retry: it gets one while fewer than
  ``max_retries`` were made (3 when the task sets none and CARROT's default is 0), after `delay` seconds
  or the backoff.
- Never retried: carrot's own refusals (arguments that do not fit the task, a task no longer
  registered), a time limit, and BaseExceptions that are not Exceptions (SystemExit).

Retries are counted in the row's ``retries``, apart from the redeliveries after a lost worker
(CARROT['max_attempts']); the wait goes through the delay levels (carrot.amqp.delays).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

from carrot import registry
from carrot.config import CarrotConfig
from carrot.exceptions import Retry

logger = logging.getLogger('carrot.consumer')

JITTER = 0.2                # up to this fraction of the backoff is added at random
EXPLICIT_RETRIES = 3        # the retries a task that raises Retry gets when it sets no max_retries
LONGEST = 2.0 ** 31         # seconds (68 years): no wait is longer, whatever a task asks


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    backoff: float | Callable
    backoff_max: float
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    explicit_max: int = EXPLICIT_RETRIES  # for carrot.Retry when max_retries is 0


def policy_for(task: str, func, config: CarrotConfig) -> RetryPolicy:
    """The policy of the task at `task` (a dotted path) whose callable is `func`: its own options (from
    @carrot.task, or the attributes of a django.tasks Task) over CARROT's defaults."""
    options = registry.task_options(task)
    for name in registry.RETRY_OPTIONS:  # a django.tasks Task made by carrot's backend carries them
        value = getattr(func, name, None)
        if value is not None and name not in options:
            options[name] = value
    max_retries = options.get('max_retries', config.max_retries)
    return RetryPolicy(max_retries=max_retries,
                       backoff=options.get('retry_backoff', config.retry_backoff),
                       backoff_max=options.get('retry_backoff_max', config.retry_backoff_max),
                       retry_on=tuple(options.get('retry_on', (Exception,))),
                       explicit_max=max_retries or EXPLICIT_RETRIES)


def next_delay(policy: RetryPolicy, error: BaseException | None, retries: int,
               rng: random.Random | None = None) -> float | None:
    """Seconds until the next try of a run that failed with `error` after `retries` retries, or None: it
    is not retried (FAILED). `error` None means a failure that is never retried."""
    if error is None:
        return None
    retry = retries + 1
    if isinstance(error, Retry):
        if retries >= policy.explicit_max:
            return None
        wait = float(error.delay) if error.delay is not None else backoff(policy, error, retry, rng)
    elif retries >= policy.max_retries or not isinstance(error, policy.retry_on):
        return None
    else:
        wait = backoff(policy, error, retry, rng)
    return None if wait is None else min(wait, LONGEST)


def backoff(policy: RetryPolicy, error: BaseException, retry: int, rng: random.Random | None = None) -> float | None:
    """The wait before the `retry`-th retry (1 for the first)."""
    if callable(policy.backoff):
        try:
            value = policy.backoff(error, retry)
        except Exception:
            logger.exception('retry_backoff %r raised; the task is not retried', policy.backoff)
            return None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float('inf'):
            logger.error('retry_backoff %r returned %r, not seconds >= 0 or None; the task is not retried',
                         policy.backoff, value)
            return None
        return min(float(value), policy.backoff_max)
    base = policy.backoff * 2.0 ** min(retry - 1, 64)  # past 2**64 the cap has long decided
    return min(base * (1 + (rng or random).uniform(0, JITTER)), policy.backoff_max)
