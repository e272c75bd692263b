"""The Workers tab: every supervisor that published a status snapshot (carrot/run/status.py), on any host.

A supervisor whose last snapshot is older than CARROT['supervisor_gone_after'] seconds is shown as
gone (it stopped, was killed, or its host is unreachable); its row stays until someone deletes it.
"""
from __future__ import annotations

import datetime as dt

from django.utils import timezone

from carrot.models import SupervisorStatus
from carrot.monitor.queries import iso


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value):
    return str(value) if value is not None else None


def slot_row(slot: dict) -> dict:
    """One slot of a snapshot, with only the documented fields and their types (the document comes
    from another process and is shown as data, never trusted as markup)."""
    if not isinstance(slot, dict):
        return {'name': '?', 'state': '?'}
    return {
        'name': _text(slot.get('name')) or '?',
        'group': _text(slot.get('group')),
        'pid': _number(slot.get('pid')),
        'generation': _number(slot.get('generation')),
        'state': _text(slot.get('state')) or '?',
        'task': _text(slot.get('task')),
        'task_id': _text(slot.get('task_id')),
        'task_age': _number(slot.get('task_age')),
        'restarts': _number(slot.get('restarts')),
        'problem': _text(slot.get('problem')),
        'memory_rss': _number(slot.get('memory_rss')),
        'memory_uss': _number(slot.get('memory_uss')),
        'memory_pss': _number(slot.get('memory_pss')),
    }


def supervisor_row(status: SupervisorStatus, now: dt.datetime, gone_after: float) -> dict:
    document = status.document if isinstance(status.document, dict) else {}
    silent_for = (now - status.last_seen).total_seconds()
    slots = document.get('slots')
    return {
        'name': status.name,
        'host': status.host,
        'pid': status.pid,
        'started': iso(status.started),
        'last_seen': iso(status.last_seen),
        'seconds_since_seen': round(silent_for, 1),
        'gone': silent_for > gone_after,
        'state': 'gone' if silent_for > gone_after else (_text(document.get('state')) or 'running'),
        'generation': status.generation,
        'settings': _text(document.get('settings')),
        'restarts': _number(document.get('restarts')),
        'slots': [slot_row(slot) for slot in slots] if isinstance(slots, list) else [],
    }


def supervisors() -> list[dict]:
    from carrot.config import get_config
    gone_after = get_config().supervisor_gone_after
    now = timezone.now()
    return [supervisor_row(status, now, gone_after) for status in SupervisorStatus.objects.all()]
