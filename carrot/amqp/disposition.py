"""What to do with a delivery: the one value the layers above hand the consume session.

The processor decides (carrot.consume.processor); the session carries it out (carrot.amqp.session):

- ACK: done -- completed, or a duplicate of a completed message;
- DEAD_LETTER: failed for good -- rejected without requeue, so RabbitMQ moves it to <queue>.dead;
- RETRY_LATER(delay): not now -- parked in the delay levels for `delay` seconds, then back in the queue:
  another worker runs it (`busy`: the waits header counts these), it came before its run_after, or its
  task failed and is retried later;
- ADOPT(new_id): it came without a message_id -- republished with one, this copy acked;
- REQUEUE: given back untouched (only when stopping before it was claimed).

A disposition whose row was committed without waiting for the disk (`on_disk` False) is carried out only
once a later commit has flushed it (carrot.consume.unflushed).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    ACK = 'ack'                    # done: completed, or a duplicate of a completed message
    DEAD_LETTER = 'dead-letter'    # failed for good: rejected without requeue, so it goes to <queue>.dead
    RETRY_LATER = 'retry-later'    # not now: parked in the delay levels for `delay` seconds
    ADOPT = 'adopt'                # no message_id: republish it with `new_id`, ack this copy
    REQUEUE = 'requeue'            # give it back untouched (only when stopping before it was claimed)


@dataclass(frozen=True)
class Disposition:
    action: Action
    delay: float | None = None
    new_id: str | None = None
    busy: bool = False  # RETRY_LATER because another worker runs it (counted in the waits header)
    on_disk: bool = True  # False: the row's commit did not wait for the disk; ack after a flush

    def __str__(self):
        extra = f' {self.delay:g}s' if self.delay is not None else f' {self.new_id}' if self.new_id else ''
        return f'{self.action.value}{extra}'


ACK = Disposition(Action.ACK)
ACK_AFTER_FLUSH = Disposition(Action.ACK, on_disk=False)
DEAD_LETTER = Disposition(Action.DEAD_LETTER)
REQUEUE = Disposition(Action.REQUEUE)


def retry_later(delay: float, busy: bool = False) -> Disposition:
    return Disposition(Action.RETRY_LATER, delay=delay, busy=busy)


def adopt(new_id: str) -> Disposition:
    return Disposition(Action.ADOPT, new_id=new_id)
