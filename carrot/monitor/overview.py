"""The overview strip: per configured queue, what RabbitMQ holds and what the log says for the last hour."""
from __future__ import annotations

from datetime import timedelta

from django.db.models import Count
from django.utils import timezone

from carrot.models import MessageLog
from carrot.monitor.broker_stats import queue_stats


def _per_queue(**filters) -> dict[str, int]:
    rows = MessageLog.objects.filter(**filters).order_by().values('queue').annotate(n=Count('id'))
    return {row['queue']: row['n'] for row in rows}


def overview() -> list[dict]:
    from carrot.config import get_config
    queues = list(get_config().all_queues)
    hour_ago = timezone.now() - timedelta(hours=1)
    completed = _per_queue(status=MessageLog.COMPLETED, completion_time__gte=hour_ago)
    failed = _per_queue(status=MessageLog.FAILED, failure_time__gte=hour_ago)
    running = _per_queue(status=MessageLog.IN_PROGRESS)
    waiting = _per_queue(status=MessageLog.WAITING)
    stats = queue_stats(queues)
    return [{
        'queue': queue.name,
        'broker': stats[queue.name].as_dict(),
        'in_progress': running.get(queue.name, 0),
        'waiting': waiting.get(queue.name, 0),
        'completed_last_hour': completed.get(queue.name, 0),
        'failed_last_hour': failed.get(queue.name, 0),
    } for queue in queues]
