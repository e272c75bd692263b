"""The sweep: sends again the message of a scheduled row that is overdue.

A delayed message (or a retry) waits in RabbitMQ's delay levels while its row says SCHEDULED, and the
consumer that takes it makes the row IN_PROGRESS. A row still SCHEDULED CARROT['delay_sweep_after']
seconds (300) after its run_after lost its message on the way -- a level queue deleted or crashed, a
broker reset -- or the message waits behind a backlog in its queue. Housekeeping (carrot.run.housekeeping)
sends such a row's message again, straight to its queue, under the row's own uuid, and marks it
PUBLISHED: if the first copy turns up after all, the consumers' claim runs the task once. A broker that
cannot take it now is tried again on the next sweep; a row that can never be sent (its task no longer
registered, its queue no longer configured) is FAILED, saying why.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from django.utils import timezone

from carrot.amqp.publisher import publisher_for
from carrot.config import BrokerConfig, get_config
from carrot.exceptions import MessageRejected
from carrot.models import MessageLog
from carrot.publish.outbox import UNSENDABLE, outgoing_from_row, send
from carrot.publish.relay import give_up

logger = logging.getLogger('carrot.publishing')

SWEEP_BATCH = 200  # rows per sweep at most, so one sweep never holds up a housekeeping tick


class Sweep:
    """Sends the overdue scheduled rows again; `sweep_overdue()` is one pass."""

    def __init__(self, batch: int = SWEEP_BATCH):
        self.batch = batch
        self.resent = 0

    def sweep_overdue(self) -> int:
        """Send up to `batch` overdue SCHEDULED rows again; returns how many RabbitMQ took."""
        config = get_config()
        cutoff = timezone.now() - timedelta(seconds=config.delay_sweep_after)
        rows = MessageLog.objects.filter(status=MessageLog.SCHEDULED, run_after__lt=cutoff) \
            .order_by('run_after', 'id')[:self.batch]
        sent = 0
        brokers: set[BrokerConfig] = set()
        for log in rows:
            try:
                message = outgoing_from_row(log)
            except UNSENDABLE as exc:
                give_up(log, exc, from_status=MessageLog.SCHEDULED)
                logger.error('sweep: %s (%s) is overdue and cannot be sent again: %s', log.task, log.uuid, exc)
                continue
            try:
                if send(message, log, store_and_forward=True, relaying=True, from_status=MessageLog.SCHEDULED):
                    sent += 1
                    brokers.add(config.queue(log.queue).broker)
            except MessageRejected as exc:  # send() has marked it FAILED
                logger.error('sweep: %s (%s) was refused by the broker: %s', log.task, log.uuid, exc)
        if sent:
            logger.warning('sweep: sent %d overdue scheduled message(s) again, straight to their queues '
                           '(their delayed copies were lost, or wait behind a backlog)', sent)
            for broker in brokers:  # a lost copy may mean a level RabbitMQ no longer runs
                publisher_for(broker).repair_levels(config.delay_levels)
        self.resent += sent
        return sent
