"""The supervisor status snapshot: what a carrot-supervisor master is running, as one JSON document.

The master (no Django) writes the document atomically to its status file whenever it changes; the
scheduler child copies it into the SupervisorStatus table every few seconds, so `carrot_daemon status`,
the tests and the monitor (on any host) read the same thing. Field names are stable (README.rst, "Status
snapshot"):

    {
      "version": 1,
      "host": "worker-1", "pid": 4242,              # the master
      "started": "2026-11-21T20:41:57+00:00",       # ISO 8601, UTC
      "updated": "2026-11-21T20:45:03+00:00",
      "settings": "myproj.settings",
      "state": "starting" | "running" | "reloading" | "stopping",
      "generation": 3,                               # settings generation the current image serves
      "image": {"pid": 4250, "generation": 3, "state": "starting" | "up" | "failed", "error": null},
      "restarts": 7,
      "slots": [
        {"name": "consumer default#1", "group": "consumer default", "pid": 4301, "generation": 3,
         "state": "starting" | "idle" | "running" | "retiring" | "backoff" | "parked",
         "task": "myapp.tasks.resize" | null, "task_id": "<MessageLog uuid>" | null,
         "task_age": 3.1 | null,                     # seconds the current task has run
         "restarts": 0, "next_start": null | seconds from "updated",
         "problem": null | "why the slot is parked",
         "memory_rss": 41234432 | null, "memory_uss": 9123840 | null}
      ]
    }
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
