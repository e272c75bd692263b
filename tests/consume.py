"""Run one consumer in the foreground, as a separate process: python tests/consume.py QUEUE MAX IDLE

Used by tests whose task kills its worker process; the test's database and vhost come from the
environment (see the subprocess_env fixture)."""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.testproject.settings')

import django  # noqa: E402

django.setup()

from carrot.consumer import Consumer  # noqa: E402

queue, max_messages, idle_timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
Consumer(None, queue, logging.getLogger('carrot.consumer'), f'{queue}#sub').run(
    max_messages=max_messages, idle_timeout=idle_timeout)
