"""The supervisor status snapshot on carrot's side: read a master's status file, copy it into the
SupervisorStatus table (the scheduler child does, every few seconds, so `carrot_daemon status`, the tests
and the monitor on any host read the same thing), and forget masters gone silent. The document itself
is produced, and its fields documented, by supervisor/status.py; carrot adds "settings" to it.
"""
from __future__ import annotations

import datetime as dt

SNAPSHOT_VERSION = 1


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def store_snapshot(document: dict) -> None:
    """Copy a master's status document into the SupervisorStatus table (one row per host:pid)."""
    from django.utils import timezone

    from carrot.models import SupervisorStatus

    host, pid = str(document.get('host', '?'))[:255], int(document.get('pid') or 0)
    SupervisorStatus.objects.update_or_create(
        name=f'{host}:{pid}'[:255],
        defaults=dict(host=host, pid=pid, started=parse_time(document.get('started')) or timezone.now(),
                      last_seen=timezone.now(), generation=int(document.get('generation') or 0),
                      document=document))


def read_snapshot(path) -> dict | None:
    """The status document a master wrote to `path`; None when there is none (no master, or it stopped).

    The master replaces the file in one rename, so a reader never sees half a document.
    """
    import json

    try:
        with open(path) as f:
            document = json.load(f)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def forget_silent_supervisors(silent_for: float) -> int:
    """Delete the SupervisorStatus rows of masters not heard from for `silent_for` seconds (stopped,
    killed, or on a host that is gone); a master that is still alive writes its row again. Returns how
    many rows were deleted."""
    from django.utils import timezone

    from carrot.models import SupervisorStatus

    cutoff = timezone.now() - dt.timedelta(seconds=silent_for)
    deleted, _ = SupervisorStatus.objects.filter(last_seen__lt=cutoff).delete()
    return deleted
