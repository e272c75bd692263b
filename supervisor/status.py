"""The status snapshot: the master's picture of its slots as one JSON document in a file.

The document's fields are described in carrot/run/status.py (the schema is the application's contract with
`carrot_daemon status` and the monitor); this module only builds it from the arbiter's state and writes
it atomically (a temporary file renamed over the old one) when it changes, and at least every
`REFRESH` seconds so that task ages and memory stay current.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arbiter import Arbiter

VERSION = 1
REFRESH = 5.0  # seconds between rewrites when nothing but ages changed
TASK_CHANGES = 0.5  # seconds between rewrites when only the tasks in hand changed
MEMORY_EVERY = 10.0  # seconds between memory readings of a child (reading smaps costs)


def iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def memory_of(pid: int) -> tuple[int | None, int | None]:
    """(RSS, USS) in bytes from /proc; (None, None) where it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {}
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
        uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        return fields.get("Rss"), uss
    except (OSError, ValueError):
        return None, None


def slot_state(child, record) -> str:
    if child is None:
        return "parked" if record.parked else "backoff" if record.failures else "starting"
    if child.retiring:
        return "retiring"
    return str(child.report and child.report.state or "starting") if child.up else "starting"


def snapshot(arbiter: "Arbiter", now: float) -> dict:
    """The document for the arbiter's state at monotonic time `now` (ages and "updated" included)."""
    by_slot = {}
    for child in arbiter.table.every():
        if child.slot not in by_slot or by_slot[child.slot].retiring:
            by_slot[child.slot] = child
    slots = []
    for slot in arbiter.slots:
        child, record = by_slot.get(slot.name), arbiter.book.records[slot.name]
        report = child.report if child else None
        age = report.age if report else None
        running = report is not None and report.state == "running"
        slots.append({
            "name": slot.name, "group": slot.group.name,
            "pid": child.pid if child else None, "generation": child.generation if child else None,
            "state": slot_state(child, record),
            "task": report.task if running else None, "task_id": report.task_id if running else None,
            "task_age": round(age + now - child.report_at, 1) if running and age is not None else None,
            "restarts": record.restarts,
            "next_start": round(record.next_start - now, 1) if child is None and record.next_start > now else None,
            "problem": record.problem if record.parked or record.failures else None,
            "memory_rss": None, "memory_uss": None,
        })
    image = arbiter.images.building or arbiter.images.serving
    document = {
        "version": VERSION, "host": socket.gethostname(), "pid": arbiter.pid, "started": iso(arbiter.started),
        "updated": iso(time.time()),
        "state": ("stopping" if arbiter.stopping else "reloading" if arbiter.readiness.reloading
                  else "running" if arbiter.readiness.ready_sent else "starting"),
        "generation": arbiter.images.serving.generation if arbiter.images.serving else 0,
        "image": {"pid": image.pid, "generation": image.generation,
                  "state": "up" if image.state == "up" else "failed" if image.state == "failed" else "starting",
                  "error": image.error} if image else None,
        "restarts": arbiter.restarts,
        "slots": slots,
    }
    document.update(arbiter.status_extra)
    return document


def status_line(arbiter: "Arbiter") -> str:
    """The one-line status for sd_notify STATUS= and the log."""
    if arbiter.stopping:
        return f"stopping: {len(arbiter.table)} children left"
    per_group: dict[str, int] = {group.name: 0 for group in arbiter.plan.groups}
    for child in arbiter.table.running():
        if child.up and not child.retiring:
            per_group[child.group] = per_group.get(child.group, 0) + 1
    counts = ", ".join(f"{name}: {n}" for name, n in per_group.items())
    line = f"{sum(per_group.values())} children up ({counts}); {arbiter.restarts} restarts"
    if arbiter.book.parked():
        line += f"; parked: {', '.join(arbiter.book.parked())}"
    return f"reloading; {line}" if arbiter.readiness.reloading else line


class StatusFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.last_shape = self.last_tasks = ""
        self.last_write = 0.0
        self.memory: dict[int, tuple[float, int | None, int | None]] = {}

    def update(self, document: dict) -> None:
        """Write `document` if the slots' make-up changed; if only tasks moved on (a busy consumer goes
        idle/running per task), at most every TASK_CHANGES seconds; else every REFRESH seconds."""
        now = time.monotonic()
        shape = json.dumps({**document, "updated": None, "slots": [
            {**s, "task_age": None, "task": None, "task_id": None,
             "state": "working" if s["state"] in ("idle", "running") else s["state"]} for s in document["slots"]]},
            sort_keys=True)
        tasks = json.dumps([(s["state"], s["task_id"]) for s in document["slots"]])
        since = now - self.last_write
        if shape == self.last_shape and (since < TASK_CHANGES or tasks == self.last_tasks) and since < REFRESH:
            return
        self.add_memory(document, now)
        self.last_shape, self.last_tasks, self.last_write = shape, tasks, now
        self.write(document)

    def add_memory(self, document: dict, now: float) -> None:
        pids = {s["pid"] for s in document["slots"] if s["pid"]}
        self.memory = {pid: value for pid, value in self.memory.items() if pid in pids}
        for entry in document["slots"]:
            pid = entry["pid"]
            if not pid:
                continue
            if pid not in self.memory or now - self.memory[pid][0] >= MEMORY_EVERY:
                self.memory[pid] = (now, *memory_of(pid))
            entry["memory_rss"], entry["memory_uss"] = self.memory[pid][1:]

    def write(self, document: dict) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(document, f, indent=1)
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
