"""Delayed delivery, measured; run it through scripts/delays.

N messages (10,000) with random delays of 1 to 120 seconds, published in random order with
publish_message(countdown=...) while carrot-supervisor runs two idle consumers of the queue. Printed:
how many ran, how many ran more than once (a claim counted twice), how many ran before their run_after,
and the lateness (claim time minus run_after) at the median, p99 and max; then one task delayed by 30
days: accepted, SCHEDULED, its run_after, where its message waits, and what the monitor's Later tab says.
The database is SQLite (the demo project's); lateness is measured by the database clock of one host.
Exit code 1 if a message did not run exactly once, ran early, or p99 lateness is over 1.5 s.
"""
import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Supervisor, setup  # noqa: E402  (scripts/bench.py: the demo project, the supervisor)

P99_LIMIT = 1.5


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--messages', type=int, default=10000)
    parser.add_argument('--max-delay', type=int, default=120)
    parser.add_argument('--concurrency', type=int, default=2)
    parser.add_argument('--vhost', default='carrot-delays')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='carrot-delays-') as run_dir:
        setup(args.vhost, run_dir, args.concurrency)
        from django.utils import timezone

        from carrot.amqp import delays
        from carrot.config import get_config
        from carrot.models import MessageLog
        from carrot.utilities import publish_message

        supervisor = Supervisor(run_dir)
        supervisor.start()
        try:
            supervisor.wait_for_log(r'ready: \d+ children up')
            rng = random.Random(12)
            countdowns = [rng.uniform(1, args.max_delay) for _ in range(args.messages)]
            started = time.monotonic()
            for countdown in countdowns:
                publish_message('shop.tasks.heartbeat', countdown=countdown)
            publishing = time.monotonic() - started
            print(f'published {args.messages} delayed messages in {publishing:.1f}s '
                  f'({args.messages / publishing:.0f}/s), delays {min(countdowns):.1f}-{max(countdowns):.1f}s')
            supervisor.wait_for(
                lambda: MessageLog.objects.filter(status='COMPLETED').count() >= args.messages,
                'every delayed message to run', timeout=args.max_delay + 120, interval=1)
            time.sleep(3)  # a duplicate, if any, would be claimed (and counted) by now
            rows = list(MessageLog.objects.values_list('status', 'attempts', 'run_after', 'started_time'))
            lateness = [(started_at - run_after).total_seconds() for _, _, run_after, started_at in rows]
            completed = sum(1 for status, *_ in rows if status == 'COMPLETED')
            repeated = sum(1 for _, attempts, *_ in rows if attempts != 1)
            early = sum(1 for late in lateness if late < 0)
            p50, p99, worst = percentile(lateness, 0.5), percentile(lateness, 0.99), max(lateness)

            month = publish_message('shop.tasks.heartbeat', countdown=30 * 86400)
            month.refresh_from_db()
            levels = get_config().delay_levels
            key = delays.routing_key(30 * 86400, levels)
            holding = [delays.level_name(level) for level, bit in enumerate(key.split('.')) if bit == '1']
            from django.test import Client
            from django.contrib.auth.models import User
            User.objects.create_superuser('delays', password='delays-only')
            client = Client(SERVER_NAME='localhost')
            client.force_login(User.objects.get(username='delays'))
            later = client.get('/carrot/api/messages/?tab=later').json()
        finally:
            supervisor.stop()

    print(f'\ncarrot delays: {args.messages} messages, delays 1-{args.max_delay}s in random order, '
          f'{args.concurrency} idle consumers, RabbitMQ {rabbitmq_version()}, no plugin')
    print(f'  ran                        {completed} of {args.messages}')
    print(f'  ran more than once         {repeated}')
    print(f'  ran before run_after       {early}')
    print(f'  lateness (s) median/p99/max {p50:.3f} / {p99:.3f} / {worst:.3f}')
    print(f'\n30-day delay: status {month.status}, run_after {month.run_after.isoformat()} '
          f'({(month.run_after - timezone.now()).total_seconds() / 86400:.2f} days ahead)')
    print(f'  its message goes through {", ".join(holding)} ({len(holding)} hops)')
    print(f'  monitor Later tab: {later["count"]} row(s); first: {later["results"][0]["task"]} '
          f'run_after {later["results"][0]["run_after"]}')
    ok = completed == args.messages and not repeated and not early and p99 <= P99_LIMIT
    print('\nOK' if ok else '\nNOT OK')
    sys.exit(0 if ok else 1)


def rabbitmq_version():
    import subprocess
    try:
        return subprocess.run(['rabbitmqctl', 'version'], capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return '?'


if __name__ == '__main__':
    main()
