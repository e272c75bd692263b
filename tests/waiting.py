"""Bounded waiting for the process-level tests: every wait ends, and a timeout says what was awaited."""
import time

import pytest


def wait_for(predicate, timeout, what='the condition', tail=None, interval=0.05):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds
    saying `what` (a string, or a callable giving one) was awaited, followed by `tail()` (e.g. logs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            pytest.fail(f'timed out after {timeout}s waiting for {text}{tail() if tail else ""}', pytrace=False)
        time.sleep(interval)
