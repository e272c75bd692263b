"""The status snapshot: the master's picture of its slots as one JSON document in a file.

The master hands `snapshot()` a `StatusView` (Arbiter.view(): a frozen copy of what it knows, taken
once per turn of its loop) and `StatusFile` writes the document atomically (a temporary file renamed
over the old one) when it changes, and at least every `REFRESH` seconds so that task ages and memory
stay current. The same view gives the one-line status (`status_line()`) for sd_notify and the title.

The document (version 1). Field names are stable; readers (carrot: `carrot_daemon status`, the
monitor, carrot/run/status.py) rely on them::

    {
      "version": 1,
      "host": "worker-1", "pid": 4242,              # the master
      "started": "2026-11-21T20:41:57+00:00",       # ISO 8601, UTC
      "updated": "2026-11-21T20:45:03+00:00",
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
         "memory_rss": 41234432 | null, "memory_uss": 9123840 | null, "memory_pss": 15728640 | null}
      ],
      ...                                            # the caller's `status_extra` (carrot: "settings")
    }

"image" is the image being built while there is one, else the one serving (null before the first).
A slot's "state" is its child's last report ("idle", "running") once the child is up; "retiring" when
it is asked to go; "backoff" or "parked" (restarts.py) when it is empty because its children failed.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping

from .protocol import Report

VERSION = 1
REFRESH = 5.0  # seconds between rewrites when nothing but ages changed
TASK_CHANGES = 0.5  # seconds between rewrites when only the tasks in hand changed
MEMORY_EVERY = 10.0  # seconds between memory readings of a child (reading smaps costs)


@dataclass(frozen=True)
class ChildView:
    slot: str
    group: str
    pid: int | None  # None until the image has said it (a pending child)
    generation: int
    up: bool
    retiring: bool
    report: Report | None
    report_at: float  # monotonic time the report arrived


@dataclass(frozen=True)
class SlotView:
    name: str
    group: str
    restarts: int
    failures: int  # young failures in a row
    parked: bool
    next_start: float  # monotonic time before which it stays empty
    problem: str | None


@dataclass(frozen=True)
class ImageView:
    pid: int
    generation: int
    state: str  # starting, up, retiring, failed
    error: str | None


@dataclass(frozen=True)
class StatusView:
    """What the status document and line show of a master, at one moment."""
    pid: int
    started: float  # wall-clock time
    stopping: bool
    reloading: bool
    ready: bool  # READY=1 sent: every slot was up once
    restarts: int
    generation: int  # of the image serving; 0 while none does
    image: ImageView | None  # the image being built, else the one serving
    groups: tuple[str, ...]  # the plan's groups, in order
    slots: tuple[SlotView, ...]  # the plan's slots, in order
    children: tuple[ChildView, ...]  # every child: running ones, then those the image has not answered for
    parked: tuple[str, ...]
    extra: Mapping[str, object]  # added to the document as it is

    @property
    def state(self) -> str:
        return ("stopping" if self.stopping else "reloading" if self.reloading
                else "running" if self.ready else "starting")

    def running(self) -> list[ChildView]:
        return [child for child in self.children if child.pid is not None]


def iso_utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def memory_of(pid: int) -> tuple[int | None, int | None, int | None]:
    """(RSS, USS, PSS) in bytes from /proc; Nones where it cannot be read. Children forked from the image
    share most of their pages with it: RSS counts those in every child, USS (private pages) is what
    a child holds of its own, PSS adds its fair share of the shared ones."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {}
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
        uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        return fields.get("Rss"), uss, fields.get("Pss")
    except (OSError, ValueError):
        return None, None, None


def slot_state(child: ChildView | None, slot: SlotView) -> str:
    if child is None:
        return "parked" if slot.parked else "backoff" if slot.failures else "starting"
    if child.retiring:
        return "retiring"
    reported = child.report.state if child.report else None
    return str(reported or "starting") if child.up else "starting"


def slot_entry(slot: SlotView, child: ChildView | None, now: float) -> dict:
    """The document's entry for one slot (memory is added by StatusFile, which reads it)."""
    report = child.report if child else None
    running = report is not None and report.state == "running"
    age = report.age if running else None
    return {
        "name": slot.name, "group": slot.group,
        "pid": child.pid if child else None, "generation": child.generation if child else None,
        "state": slot_state(child, slot),
        "task": report.task if running else None, "task_id": report.task_id if running else None,
        "task_age": round(age + now - child.report_at, 1) if age is not None else None,
        "restarts": slot.restarts,
        "next_start": round(slot.next_start - now, 1) if child is None and slot.next_start > now else None,
        "problem": slot.problem if slot.parked or slot.failures else None,
        "memory_rss": None, "memory_uss": None, "memory_pss": None,
    }


def snapshot(view: StatusView, now: float) -> dict:
    """The document for `view` at monotonic time `now` (ages and "updated" included)."""
    by_slot: dict[str, ChildView] = {}
    for child in view.children:  # a slot's new child is shown rather than the old one it replaces
        if child.slot not in by_slot or by_slot[child.slot].retiring:
            by_slot[child.slot] = child
    image = view.image
    document = {
        "version": VERSION, "host": socket.gethostname(), "pid": view.pid, "started": iso_utc(view.started),
        "updated": iso_utc(time.time()),
        "state": view.state,
        "generation": view.generation,
        "image": {"pid": image.pid, "generation": image.generation,
                  "state": "up" if image.state == "up" else "failed" if image.state == "failed" else "starting",
                  "error": image.error} if image else None,
        "restarts": view.restarts,
        "slots": [slot_entry(slot, by_slot.get(slot.name), now) for slot in view.slots],
    }
    document.update(view.extra)
    return document


def status_line(view: StatusView) -> str:
    """The one-line status for sd_notify STATUS= and the log."""
    if view.stopping:
        return f"stopping: {len(view.running())} children left"
    per_group: dict[str, int] = {name: 0 for name in view.groups}
    for child in view.running():
        if child.up and not child.retiring:
            per_group[child.group] = per_group.get(child.group, 0) + 1
    counts = ", ".join(f"{name}: {n}" for name, n in per_group.items())
    line = f"{sum(per_group.values())} children up ({counts}); {view.restarts} restarts"
    if view.parked:
        line += f"; parked: {', '.join(view.parked)}"
    return f"reloading; {line}" if view.reloading else line


class StatusFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.last_shape = self.last_tasks = ""
        self.last_write = 0.0
        self.memory: dict[int, tuple[float, int | None, int | None, int | None]] = {}

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
            entry["memory_rss"], entry["memory_uss"], entry["memory_pss"] = self.memory[pid][1:]

    def write(self, document: dict) -> None:
        # A new file of an unpredictable name, created exclusively (mkstemp: O_EXCL, mode 0600), then
        # renamed over the old one: whoever can write the directory cannot make the master write through a
        # link they planted (os.replace replaces a link at the target name, it does not follow it).
        directory, name = os.path.split(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=1)
            os.chmod(tmp, 0o644)  # readable by `carrot_daemon status` and the monitor's host user
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
