"""Publish a handful of tasks, wait for the supervisor to run them, and print what happened."""
import time

from django.core.management.base import BaseCommand
from django.utils import timezone

from carrot.models import MessageLog, ScheduledTask
from carrot.utilities import create_scheduled_task, publish_message
from shop import tasks

WAIT = 60


class Command(BaseCommand):
    help = 'Publish demo tasks and report how carrot ran them.'

    def add_arguments(self, parser):
        parser.add_argument('--keep-schedule', action='store_true',
                            help='leave the 2-second schedule running (scripts/demo --serve)')

    def handle(self, *args, **options):
        MessageLog.objects.all().delete()
        ScheduledTask.objects.filter(task_name='demo heartbeat').delete()
        started = timezone.now()
        logs = [
            publish_message(tasks.send_invoice, 1001, amount=99.5),
            publish_message(tasks.send_invoice, 1002, amount=12.0, priority=5),
            publish_message(tasks.resize_image, 'cat.png', width=640),
            publish_message(tasks.monthly_report, '2026-11', queue='reports'),
            publish_message(tasks.charge_card, 1003),
        ]
        create_scheduled_task(tasks.heartbeat, {'seconds': 2}, task_name='demo heartbeat')
        self.stdout.write(f'published {len(logs)} tasks and a schedule (every 2 s); waiting for the workers...')

        deadline = time.monotonic() + WAIT
        pending = {log.pk for log in logs}
        while pending and time.monotonic() < deadline:
            done = MessageLog.objects.filter(pk__in=pending, status__in=['COMPLETED', 'FAILED'])
            pending -= set(done.values_list('pk', flat=True))
            time.sleep(0.2)
        time.sleep(3)  # let the schedule fire a couple of times
        if not options['keep_schedule']:
            ScheduledTask.objects.filter(task_name='demo heartbeat').update(active=False)

        self.stdout.write('')
        self.stdout.write(f'{"task":<28} {"queue":<8} {"status":<10} {"worker":<18} {"took":>6}  output / error')
        for log in MessageLog.objects.filter(pk__in=[log.pk for log in logs]).order_by('publish_time'):
            took = f'{log.duration.total_seconds():.2f}s' if log.duration else '-'
            result = log.output if log.status == 'COMPLETED' else log.exception
            self.stdout.write(f'{log.task.rsplit(".", 1)[-1]:<28} {log.queue:<8} {log.status:<10} '
                              f'{log.worker:<18} {took:>6}  {result}')
            for line in (log.log or '').splitlines():
                self.stdout.write(f'{"":<30}log: {line}')
        runs = MessageLog.objects.filter(task='shop.tasks.heartbeat', publish_time__gte=started).count()
        self.stdout.write(f'\nthe 2-second schedule was published {runs} time(s)')
        builtin = MessageLog.objects.filter(task='carrot.helper_tasks.cleanup', publish_time__gte=started).count()
        if builtin:
            self.stdout.write(f"and carrot's own hourly cleanup of old log rows ran {builtin} time(s) (it runs once "
                              f"when a scheduler starts; CARROT['cleanup_after_days'])")
        if pending:
            self.stderr.write(f'{len(pending)} task(s) did not finish within {WAIT}s')
            raise SystemExit(1)
