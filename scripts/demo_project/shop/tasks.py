"""The demo's tasks: every function here is a registered carrot task (an installed app's tasks module)."""
import logging
import time

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
