"""The demo's tasks: every function here is a registered carrot task (an installed app's tasks module)."""
import logging
import os
import time

from django.conf import settings

logger = logging.getLogger('carrot')


def send_invoice(order_id, amount):
    logger.info('rendering invoice for order %s', order_id)
    time.sleep(0.2)
    logger.info('mailed invoice for %.2f EUR', amount)
    return {'order_id': order_id, 'sent': True}


def resize_image(name, width):
    time.sleep(0.3)
    return f'{name} resized to {width}px'


def monthly_report(month):
    logger.info('building the report for %s', month)
    time.sleep(0.5)
    return {'month': month, 'orders': 42}


def charge_card(order_id):
    raise RuntimeError(f'card declined for order {order_id}')


def heartbeat():
    return 'still here'


def noop():
    """Does nothing: scripts/bench drains a backlog of these, so what it times is carrot's own cost."""


def note_start(token):
    """Writes when its body began, first thing: scripts/bench's publish-to-start latency (the log row's
    started_time is set at the claim, before the body, so it would flatter the figure)."""
    started = time.time()
    with open(os.path.join(settings.RUN_DIR, 'task-starts.txt'), 'a') as f:
        f.write(f'{token} {started!r}\n')  # one short append: whole lines even with two children writing
