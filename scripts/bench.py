"""Measure carrot against a raw pika baseline in the same run; run it through scripts/bench.

Figures (messages per second, and the ratio to raw pika doing the same broker work):
  publish   raw: basic_publish with confirms on one connection
            carrot: publish_message (MessageLog row + confirmed publish)
  consume   raw: basic_consume, prefetch 1, ack each message
            carrot: one in-process Consumer (get-or-create log, IN_PROGRESS, run, COMPLETED, ack)
  end-to-end carrot-supervisor with N consumer children draining a published backlog
and the supervisor's lifecycle: start to ready, child respawn after SIGKILL, HUP to new children, TERM
to exit when idle, and the memory of the master and a child. The database is SQLite (the demo project's);
every number comes from this machine and this run, so compare ratios, not absolutes, across machines.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(ROOT, 'scripts', 'demo_project')


def setup(vhost, run_dir, concurrency):
    os.environ['CARROT_DEMO_DIR'] = run_dir
    os.environ['CARROT_DEMO_BROKER'] = f'amqp://guest:guest@127.0.0.1:5672/{vhost}'
    os.environ['CARROT_DEMO_CONCURRENCY'] = str(concurrency)
    # As in production: with DEBUG on, Django keeps the last 9,000 queries of every connection in
    # memory, which shows up as ~12 MiB of growth per consumer child after a few thousand tasks.
    os.environ.setdefault('CARROT_DEMO_DEBUG', '0')
    os.environ['DJANGO_SETTINGS_MODULE'] = 'demosite.settings'
    sys.path.insert(0, PROJECT)
    import django
    django.setup()
    from django.core.management import call_command
    call_command('migrate', verbosity=0)
    from carrot.models import ScheduledTask
    ScheduledTask.objects.update(active=False)  # no scheduled runs mixed into the figures


def raw_publish(n):
    import pika
    from carrot.amqp.declare import queue_arguments
    from carrot.config import get_config
    queue = get_config().queue('default')
    connection = pika.BlockingConnection(queue.broker.connection_parameters())
    channel = connection.channel()
    channel.queue_declare('bench-raw', durable=True, arguments=queue_arguments(queue))
    channel.queue_purge('bench-raw')
    channel.confirm_delivery()
    body = b'{"args": [], "kwargs": {}}'
    started = time.perf_counter()
    for i in range(n):
        channel.basic_publish('', 'bench-raw', body, pika.BasicProperties(
            headers={'type': 'shop.tasks.heartbeat'}, message_id=str(i), content_type='application/json',
            delivery_mode=2))
    elapsed = time.perf_counter() - started
    connection.close()
    return n / elapsed


def raw_consume(n):
    import pika
    from carrot.config import get_config
    queue = get_config().queue('default')
    connection = pika.BlockingConnection(queue.broker.connection_parameters())
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    seen = 0
    started = time.perf_counter()
    for method, _, _ in channel.consume('bench-raw', inactivity_timeout=5):
        if method is None:
            break
        channel.basic_ack(method.delivery_tag)
        seen += 1
        if seen == n:
            break
    elapsed = time.perf_counter() - started
    channel.cancel()
    channel.queue_delete('bench-raw')
    connection.close()
    return seen / elapsed


def carrot_publish(n):
    from carrot.utilities import publish_message
    started = time.perf_counter()
    for _ in range(n):
        publish_message('shop.tasks.heartbeat')
    return n / (time.perf_counter() - started)


def carrot_consume(n):
    import logging
    from carrot.consumer import Consumer
    from carrot.models import MessageLog
    logging.getLogger('carrot').setLevel(logging.WARNING)
    consumer = Consumer(None, 'default')
    started = time.perf_counter()
    consumer.run(max_messages=n, idle_timeout=5)
    elapsed = time.perf_counter() - started
    done = MessageLog.objects.filter(status='COMPLETED').count()
    return consumer.messages_settled / elapsed, done


class Supervisor:
    def __init__(self, run_dir):
        self.log = os.path.join(run_dir, 'carrot.log')
        self.status_file = os.path.join(run_dir, 'carrot.status.json')
        self.process = None

    def start(self):
        open(self.log, 'w').close()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'carrot.cli', '--pythonpath', PROJECT, '--logfile', self.log, '--no-scheduler',
             '--status-file', self.status_file],
            cwd=PROJECT, env=dict(os.environ), stdin=subprocess.DEVNULL)

    def log_text(self):
        with open(self.log) as f:
            return f.read()

    def wait_for(self, predicate, what, timeout=60, interval=0.001):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise SystemExit(f'bench: {what} did not happen within {timeout}s (log: {self.log})')

    def wait_for_log(self, pattern, timeout=60, after=0):
        return self.wait_for(lambda: re.search(pattern, self.log_text()[after:]), repr(pattern), timeout, 0.01)

    def snapshot(self):
        from carrot.run.status import read_snapshot
        return read_snapshot(self.status_file) or {}

    def processes(self):
        """(role, psutil.Process) for the master, its image(s) and every child, by their titles."""
        import psutil
        master = psutil.Process(self.process.pid)
        found = [('master', master)]
        for child in master.children():
            try:
                title = ' '.join(child.cmdline()).strip().replace('carrot-supervisor: ', '')
            except psutil.Error:
                continue
            role = 'image' if title.startswith('image') else title.rsplit(' ', 1)[0] if title.endswith(' idle') \
                else title
            found.append((role, child))
        return found

    def consuming(self):
        """slot -> pid of the children whose title says they consume (idle)."""
        import psutil
        kids = {}
        for role, proc in self.processes():
            try:
                if role.startswith('consumer ') and ' '.join(proc.cmdline()).strip().endswith(' idle'):
                    kids[role] = proc.pid
            except psutil.Error:
                pass
        return kids

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            self.process.wait(timeout=30)


def memory(supervisor):
    """role -> (USS, PSS, RSS) in MiB, for every process of the supervisor."""
    import psutil
    figures = {}
    for role, proc in supervisor.processes():
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        figures[role] = (info.uss / 2 ** 20, info.pss / 2 ** 20, info.rss / 2 ** 20)
    return figures


def supervisor_figures(n, kills):
    from carrot.models import MessageLog
    from carrot.utilities import publish_message

    MessageLog.objects.all().delete()
    for _ in range(n):
        publish_message('shop.tasks.heartbeat')
    supervisor = Supervisor(os.environ['CARROT_DEMO_DIR'])
    figures = {}
    try:
        supervisor.start()
        supervisor.wait_for_log(r'ready: \d+ children up')
        figures['start_to_ready_s'] = time.monotonic() - supervisor.started
        started = time.perf_counter()
        supervisor.wait_for(lambda: MessageLog.objects.filter(status='COMPLETED').count() >= n,
                            'draining the backlog', timeout=600, interval=0.05)
        figures['end_to_end_per_s'] = n / (time.perf_counter() - started)
        figures['memory_after_tasks'] = memory(supervisor)

        # Respawn: SIGKILL a consuming child; time until its slot holds a new child that consumes.
        times = []
        for _ in range(kills):
            kids = supervisor.wait_for(supervisor.consuming, 'children consuming')
            slot, pid = sorted(kids.items())[0]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            supervisor.wait_for(lambda: supervisor.consuming().get(slot) not in (None, pid), 'a respawn', 10)
            times.append((time.monotonic() - killed) * 1000)
            time.sleep(0.2)
        times.sort()
        figures['respawn_to_consuming_ms'] = times[len(times) // 2]
        figures['respawn_to_consuming_max_ms'] = times[-1]

        # HUP: until every slot holds a child of the new image generation that consumes.
        time.sleep(1)
        generation = supervisor.snapshot().get('generation', 1)
        slots = {s['name'] for s in supervisor.snapshot().get('slots', ())}
        mark = len(supervisor.log_text())
        supervisor.process.send_signal(signal.SIGHUP)
        hup = time.monotonic()

        def all_new():
            document = supervisor.snapshot()
            entries = document.get('slots', ())
            return document.get('generation') == generation + 1 and {e['name'] for e in entries} == slots and \
                all(e['generation'] == generation + 1 and e['state'] == 'idle' for e in entries)

        supervisor.wait_for(all_new, 'all children on the new image', timeout=60)
        figures['hup_to_all_children_on_new_code_s'] = time.monotonic() - hup
        supervisor.wait_for_log(r'reload done', after=mark)
        time.sleep(1)
        figures['memory_idle'] = memory(supervisor)

        supervisor.process.send_signal(signal.SIGTERM)
        term = time.monotonic()
        supervisor.process.wait(timeout=60)
        figures['term_to_exit_idle_s'] = time.monotonic() - term
    finally:
        supervisor.stop()
    return figures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--messages', type=int, default=2000)
    parser.add_argument('--concurrency', type=int, default=2)
    parser.add_argument('--vhost', default='carrot-bench')
    parser.add_argument('--kills', type=int, default=11, help='SIGKILLs for the respawn median')
    parser.add_argument('--supervisor-only', action='store_true',
                        help='only the supervisor figures (e.g. --messages 10000 for 5,000 tasks per child)')
    args = parser.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory(prefix='carrot-bench-') as run_dir:
        setup(args.vhost, run_dir, args.concurrency)
        from carrot.models import MessageLog
        if not args.supervisor_only:
            raw_pub = raw_publish(n)
            raw_con = raw_consume(n)
            MessageLog.objects.all().delete()
            pub = carrot_publish(n)
            con, done = carrot_consume(n)
        sup = supervisor_figures(n, args.kills)

    print(f'\ncarrot bench: {n} messages, SQLite, RabbitMQ on 127.0.0.1, {os.cpu_count()} CPUs')
    if args.supervisor_only:
        raw_pub = raw_con = pub = con = float('nan')
        done = '-'

    print(f'{"":<36}{"msg/s":>10}{"vs raw pika":>14}')
    print(f'{"raw pika publish (confirms)":<36}{raw_pub:>10.0f}{"1.00":>14}')
    print(f'{"carrot publish_message":<36}{pub:>10.0f}{pub / raw_pub:>14.2f}')
    print(f'{"raw pika consume (prefetch 1, ack)":<36}{raw_con:>10.0f}{"1.00":>14}')
    print(f'{"carrot consumer, 1 process":<36}{con:>10.0f}{con / raw_con:>14.2f}')
    print(f'{f"carrot-supervisor, {args.concurrency} consumers":<36}{sup["end_to_end_per_s"]:>10.0f}'
          f'{sup["end_to_end_per_s"] / raw_con:>14.2f}')
    print(f'(carrot consumer completed {done} of {n} logged tasks)')
    print('\nsupervisor')
    for key in ('start_to_ready_s', 'respawn_to_consuming_ms', 'respawn_to_consuming_max_ms',
                'hup_to_all_children_on_new_code_s', 'term_to_exit_idle_s'):
        print(f'  {key:<36}{sup[key]:>10.3f}')
    print(f'  (respawn over {args.kills} SIGKILLs of a consuming child: median and max)')
    for title, key in (('memory, idle (fresh children after HUP)', 'memory_idle'),
                       (f'memory after {n} tasks ({n // args.concurrency} per child)', 'memory_after_tasks')):
        print(f'\n{title}, MiB{"USS":>10}{"PSS":>8}{"RSS":>8}')
        for role, (uss, pss, rss) in sorted(sup[key].items()):
            print(f'  {role:<44}{uss:>8.1f}{pss:>8.1f}{rss:>8.1f}')


if __name__ == '__main__':
    main()
