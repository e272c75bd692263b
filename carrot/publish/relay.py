"""The relay: sends the rows that were left WAITING for the broker.

A row waits when the broker could not take its message (an outage), or when the process that wrote it
died before its after-commit send. Housekeeping (carrot.run.housekeeping) calls `Relay.relay_waiting()`
every tick on every host; each row keeps its uuid as the AMQP message_id, so a message sent twice (a
lost confirm, the relay racing the original sender) is claimed and run once by the consumers.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.db import DatabaseError
from django.utils import timezone

from carrot.backoff import Backoff
from carrot.config import BrokerConfig, get_config
from carrot.exceptions import BrokerUnavailable, MessageRejected
from carrot.models import MessageLog
from carrot.publish.outbox import UNSENDABLE, outgoing_from_row, send

logger = logging.getLogger('carrot.publishing')

RELAY_AFTER = 5.0        # seconds a WAITING row is left to the process that wrote it before the relay sends it
RELAY_BATCH = 200        # rows the relay sends per call at most, so one call never holds up a housekeeping tick
RELAY_BUDGET = 2.0       # seconds one call spends sending batch after batch, at most (about)
RELAY_BACKOFF_CAP = 60.0  # the longest wait before the relay tries an unavailable broker again


class Relay:
    """Sends rows left WAITING, with a backoff per broker while that broker stays unavailable."""

    def __init__(self, relay_after: float = RELAY_AFTER, batch: int = RELAY_BATCH,
                 backoff_cap: float = RELAY_BACKOFF_CAP):
        self.relay_after = relay_after
        self.batch = batch
        self.backoff_cap = backoff_cap
        self.unavailable: dict[BrokerConfig, Backoff] = {}  # brokers that could not take a message
        self.relayed = 0

    def relay_waiting(self, budget: float = RELAY_BUDGET) -> int:
        """Send WAITING rows older than `relay_after` seconds, `batch` at a time, for up to about `budget`
        seconds (a bulk requeue leaves thousands); returns how many were sent."""
        sent = 0
        deadline = time.monotonic() + budget
        while True:
            sent_now = self._relay_batch()
            sent += sent_now
            if sent_now < self.batch or time.monotonic() >= deadline:
                return sent

    def _relay_batch(self) -> int:
        config = get_config()
        skipped_queues = [q.name for q in config.queues
                          if q.broker in self.unavailable and self.unavailable[q.broker].waiting()]
        rows = MessageLog.objects.filter(
            status=MessageLog.WAITING,
            publish_time__lt=timezone.now() - timedelta(seconds=self.relay_after)
        ).exclude(queue__in=skipped_queues).order_by('publish_time', 'id')[:self.batch]
        sent = 0
        down: set[BrokerConfig] = set()
        up: set[BrokerConfig] = set()
        for log in rows:
            try:
                broker = config.queue(log.queue).broker
                if broker in down:
                    continue
                message = outgoing_from_row(log)
            except UNSENDABLE as exc:
                give_up(log, exc)
                continue
            try:
                if send(message, log, store_and_forward=True, relaying=True):
                    sent += 1
                    up.add(broker)
                else:
                    down.add(broker)
            except MessageRejected as exc:  # send() has marked it FAILED
                logger.error('relay: %s (%s) was refused by the broker: %s', log.task, log.uuid, exc)
                up.add(broker)
            except DatabaseError:
                raise  # the database is away: housekeeping backs off, and every row waits on
            except Exception as exc:  # noqa: BLE001 -- a fault of this row's own (a value the AMQP client
                # cannot encode, a bug) would come back on every tick and hold up every row behind it
                logger.exception('relay: sending %s (%s) failed unexpectedly', log.task, log.uuid)
                give_up(log, exc)
        self._note_brokers(up, down)
        self.relayed += sent
        if sent:
            logger.info('relay: sent %d message(s) that were waiting for the broker', sent)
        return sent

    def _note_brokers(self, up: set[BrokerConfig], down: set[BrokerConfig]) -> None:
        for broker in down:
            if broker not in self.unavailable:  # one line per outage, not one per try
                logger.warning('relay: broker %s is unavailable; waiting messages are kept and retried '
                               '(backing off up to %.0fs)', broker, self.backoff_cap)
                self.unavailable[broker] = Backoff(base=1.0, cap=self.backoff_cap, jitter=False)
            self.unavailable[broker].wait_next()
        for broker in up - down:
            if self.unavailable.pop(broker, None) is not None:
                logger.info('relay: broker %s takes messages again', broker)


def give_up(log: MessageLog, exc: Exception, from_status: str = MessageLog.WAITING) -> None:
    """A WAITING (or `from_status`) row whose message can never be sent: FAILED, saying why."""
    what = 'a waiting message could not be relayed' if from_status == MessageLog.WAITING else \
        'an overdue scheduled message could not be sent again'
    reason = f'{type(exc).__name__}: {what}: {exc}'
    changed = MessageLog.objects.filter(pk=log.pk, status=from_status).update(
        status=MessageLog.FAILED, failure_time=timezone.now(), exception=reason)
    if changed:
        logger.error('relay: %s (%s) cannot be sent and is marked FAILED: %s', log.task, log.uuid, exc)
    else:  # deleted from the monitor, or taken by a worker, while it was being sent: not ours to mark
        logger.warning('relay: %s (%s) could not be sent (%s); its row is no longer %s, and is left as it is',
                       log.task, log.uuid, exc, from_status)


def send_now(log: MessageLog) -> None:
    """Send a WAITING row at once, after the commit that wrote it (a created carrot.models.Task): what
    cannot be sent now waits for the relay, and a row that can never be sent is FAILED saying why."""
    try:
        send_waiting(log)
    except MessageRejected as exc:
        logger.error('%s (%s) cannot be sent: %s', log.task, log.uuid, exc)
    except BrokerUnavailable:
        pass  # the row waits; the relay sends it


def send_waiting(log: MessageLog) -> None:
    """Send one WAITING row now (the monitor's "send now"), with its own uuid. BrokerUnavailable when the
    broker still cannot take it (the row keeps waiting); MessageRejected when it never will (FAILED). A
    relay sending the same row at the same moment is harmless: the consumers' claim runs it once."""
    try:
        message = outgoing_from_row(log)
    except UNSENDABLE as exc:
        give_up(log, exc)
        raise MessageRejected(f'it cannot be sent: {exc}') from None
    if not send(message, log, store_and_forward=True, relaying=True):
        raise BrokerUnavailable('the broker still cannot take it; it keeps waiting and will be relayed')
