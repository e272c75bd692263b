"""A web process whose request timeouts are exceptions raised by a signal handler (SIGALRM and the like)
publishes while those exceptions land anywhere inside publish_message: in Django's transaction
handling, in psycopg, in pika's connection workflow, in carrot. A call that is interrupted raises; a
call that returns a row must have that row committed and its message on its way, and no call may hang.
As in a view with CONN_MAX_AGE 0, every tenth publish opens its database connection anew (connect,
PREPARE, the first row written inside transaction.atomic()), so those paths are interrupted too.

Found this way: a row returned PUBLISHED that was never committed (an interrupt inside
transaction.atomic()'s entry left the driver in a transaction Django did not know of), and a connect that
waited for ever (pika's workflow swallowed the exception with none of its timers armed).
"""
import os
import queue
import random
import signal
import threading
import time
from collections import Counter

import pytest
from django.db import connection

from carrot.models import MessageLog
from carrot.publish.relay import Relay
from carrot.utilities import publish_message
from tests.conftest import raw_connection
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

STORM_SECONDS = float(os.environ.get('CARROT_TEST_STORM_SECONDS', 12))


class RequestTimeout(Exception):
    """What a signal-based request timeout raises."""


class Storm:
    """One request timeout per publish, at a random moment of its first `window` seconds: SIGUSR1 sent
    to the main thread, whose handler raises RequestTimeout if that call is still going. Not SIGALRM:
    pytest-timeout's.

    The window starts at 8 ms (most of a call) and follows the outcomes (`outcome()`): wider after an
    interrupted call, narrower after one that returned, down to 8 ms. An interrupted call leaves its
    broker connection behind, so the next one connects anew; on a slow or busy machine, where a connect
    outlasts a fixed window, every call would be interrupted and none get through. So about a quarter of
    the calls are interrupted wherever the window is wider than 8 ms."""

    NARROWEST, WIDEST = 0.008, 0.25

    def __init__(self):
        self.window = self.widest_seen = self.NARROWEST
        self.call = 0           # the call in progress (0: none)
        self.arming = threading.Event()
        self.stopping = threading.Event()
        self.main = threading.main_thread().ident
        self.previous = None
        self.thread = threading.Thread(target=self._send, daemon=True)

    def outcome(self, interrupted: bool) -> None:
        if interrupted:
            self.window = min(self.window * 1.1, self.WIDEST)
        else:
            self.window = max(self.window * 0.97, self.NARROWEST)
        self.widest_seen = max(self.widest_seen, self.window)

    def arm(self, call: int) -> None:
        self.call = call
        self.arming.set()

    def disarm(self) -> None:
        self.call = 0

    def _raise(self, signum, frame):
        if self.call:
            self.call = 0
            raise RequestTimeout()

    def _send(self):
        while not self.stopping.is_set():
            if not self.arming.wait(0.1):
                continue
            self.arming.clear()
            call = self.call
            time.sleep(random.uniform(0, self.window))
            if call and self.call == call:
                signal.pthread_kill(self.main, signal.SIGUSR1)

    def __enter__(self):
        self.previous = signal.signal(signal.SIGUSR1, self._raise)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.disarm()
        self.stopping.set()
        self.thread.join(5)
        signal.signal(signal.SIGUSR1, self.previous)


class CommittedCheck:
    """Reads each returned row back on a connection of its own (a thread's), right after the call: the
    row must be committed when publish_message returns, not made visible later by someone else's commit."""

    def __init__(self):
        self.uuids = queue.Queue()
        self.invisible = []
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self):
        from django.db import connections
        try:
            while (uuid := self.uuids.get()) is not None:
                if not MessageLog.objects.filter(uuid=uuid).exists():
                    self.invisible.append(uuid)
        finally:
            connections.close_all()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.uuids.put(None)
        self.thread.join(60)


def drain_ids(name: str) -> Counter:
    """message_id -> copies of every message in queue `name` (taken off it)."""
    found = Counter()
    broker = raw_connection()
    try:
        channel = broker.channel()
        while True:
            method, properties, _ = channel.basic_get(name, auto_ack=True)
            if method is None:
                return found
            found[properties.message_id] += 1
    finally:
        broker.close()


# A timeout raised inside a weakref or gc callback is printed and dropped by Python: expected here.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.timeout(180)
def test_request_timeouts_raised_into_publish_message_lose_no_returned_task_and_hang_nothing():
    returned, interrupted, longest, calls = [], Counter(), 0.0, 0
    deadline = time.monotonic() + STORM_SECONDS
    with CommittedCheck() as committed, Storm() as storm:
        while time.monotonic() < deadline:
            if len(returned) % 10 == 0:
                connection.close()  # a request's end (CONN_MAX_AGE 0): the next publish opens one, as a view's does
            started = time.monotonic()
            calls += 1
            try:
                storm.arm(calls)
                row = publish_message(tasks.add, len(returned), 0)
                storm.disarm()
            except Exception as exc:  # noqa: BLE001 -- pika turns some into its own errors
                storm.disarm()
                storm.outcome(interrupted=True)
                interrupted[type(exc).__name__] += 1
                continue
            finally:
                longest = max(longest, time.monotonic() - started)
            storm.outcome(interrupted=False)
            returned.append((row.uuid, row.status))
            committed.uuids.put(row.uuid)
    print(f'FIGURE interrupt_storm returned={len(returned)} interrupted={dict(interrupted)} '
          f'longest_call_s={longest:.2f} widest_window_ms={storm.widest_seen * 1000:.1f}')
    assert len(returned) >= 20 and interrupted['RequestTimeout'] >= 20  # both happened, many times
    assert not committed.thread.is_alive()
    assert not committed.invisible, \
        f'{len(committed.invisible)} of {len(returned)} rows were not committed when their call returned'

    connection.close()  # anything written and not committed goes now, as at the end of a request
    rows = dict(MessageLog.objects.filter(uuid__in=[uuid for uuid, _ in returned]).values_list('uuid', 'status'))
    lost = [(uuid, status) for uuid, status in returned if uuid not in rows]
    assert not lost, f'{len(lost)} of {len(returned)} returned rows were never committed: {lost[:5]}'
    assert {status for _, status in returned} <= {'PUBLISHED', 'WAITING'}

    relay = Relay(relay_after=0)  # what the housekeeping child does with the rows left WAITING, tick by tick
    for _ in range(50):
        if not relay.relay_waiting():
            break
    on_queue = drain_ids('default')
    missing = [uuid for uuid, _ in returned if str(uuid) not in on_queue]
    assert not missing, f'{len(missing)} returned tasks never reached the queue: {missing[:5]}'
