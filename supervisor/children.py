"""The master's table of children: who holds which slot, their heartbeat pipes, what they report.

A passive part of the master: it holds records and reads pipes, and decides nothing. A child enters the
table when the master asks an image for it (`request`, pid unknown: *pending*), gets its pid when the
image answers (`adopt`), and leaves when it is reaped (`remove`). What a child writes on its
heartbeat pipe is described in protocol.py.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time
from dataclasses import dataclass

from .images import Image
from .plan import Slot
from .protocol import Report, read_reports


@dataclass(eq=False)
class Child:
    """The master's record of one child, from the spawn request (pid None) until it is reaped."""

    slot: str
    group: str
    generation: int
    heartbeat_fd: int
    started_at: float
    last_beat: float
    pid: int | None = None
    image: Image | None = None  # the image asked for it, until it answers with the pid
    request: int | None = None
    up: bool = False  # has sent a heartbeat: its body is running, not just forked
    working: bool = False  # has reported a state (a consumer on its queue): able to do its job
    report: Report | None = None  # its last report: state, task, task_id, age
    report_at: float = 0.0
    retiring: bool = False  # asked to go (reload, TTOU, stop): its exit is no failure
    retire_deadline: float | None = None
    aborted_at: float | None = None
    killed: str | None = None  # why the master SIGKILLed it, if it did
    buffer: bytes = b""

    def describe(self) -> str:
        return f"{self.slot} (pid {self.pid})"

    def overdue(self, now: float, heartbeat_timeout: float, abort_grace: float) -> str | None:
        """What the master owes this child now: "retired" (SIGKILL: past its graceful timeout after it
        was retired), "silent" (SIGABRT: no heartbeat for `heartbeat_timeout`, so faulthandler writes its
        stacks), "hung" (SIGKILL: still there `abort_grace` after the SIGABRT), or None."""
        if self.killed:
            return None
        if self.retire_deadline and now >= self.retire_deadline:
            return "retired"
        if self.aborted_at is None:
            return "silent" if now - self.last_beat > heartbeat_timeout else None
        return "hung" if now - self.aborted_at >= abort_grace else None

    def next_deadline(self, now: float, heartbeat_timeout: float, abort_grace: float) -> float:
        """When overdue() may next change its answer (for the master's poll timeout)."""
        deadline = self.aborted_at + abort_grace if self.aborted_at else self.last_beat + heartbeat_timeout
        return min(deadline, self.retire_deadline or deadline)


class ChildTable:
    def __init__(self, poller: select.poll, logger: logging.Logger) -> None:
        self.poller = poller
        self.log = logger
        self.by_pid: dict[int, Child] = {}
        self.pending: list[Child] = []
        self.by_fd: dict[int, Child] = {}
        self.unknown_exits: dict[int, tuple[int, float]] = {}  # reaped before the image told us the pid

    def __len__(self) -> int:
        return len(self.by_pid)

    def running(self) -> list[Child]:
        return list(self.by_pid.values())

    def every(self) -> list[Child]:
        return [*self.by_pid.values(), *self.pending]

    def signal(self, child: Child, signum: int, reason: str | None = None) -> None:
        """Send `signum` to `child`; a SIGKILL records `reason` (its exit is then no surprise)."""
        if signum == signal.SIGKILL:
            child.killed = reason or "killed"
        try:
            os.kill(child.pid, signum)
        except (ProcessLookupError, TypeError):
            pass  # already gone (the reaper will see it), or not forked yet

    def signal_all(self, signum: int) -> None:
        for child in self.running():
            self.signal(child, signum)

    def retire(self, child: Child, deadline: float) -> None:
        """Ask `child` to go (TERM, at once or when its pid is known) and to be gone by `deadline`."""
        if child.retiring:
            return
        child.retiring, child.retire_deadline = True, deadline
        if child.pid is not None:
            self.signal(child, signal.SIGTERM)

    def abort(self, child: Child, now: float) -> None:
        """SIGABRT for a silent child: faulthandler writes its stacks; SIGKILL follows (Child.overdue)."""
        child.aborted_at = now
        self.signal(child, signal.SIGABRT)

    def kill_all(self, reason: str) -> None:
        """SIGKILL every running child not killed yet."""
        for child in self.running():
            if not child.killed:
                self.signal(child, signal.SIGKILL, reason)

    def next_deadline(self, now: float, heartbeat_timeout: float, abort_grace: float) -> float | None:
        """The earliest moment a running child may become overdue (see Child.overdue)."""
        deadlines = [c.next_deadline(now, heartbeat_timeout, abort_grace) for c in self.running()]
        return min(deadlines) if deadlines else None

    def mark_retiring(self) -> None:
        """Every child is on its way out (the master stops): their exits are no failures."""
        for child in self.every():
            child.retiring = True

    def up_slots(self, generation: int) -> set[str]:
        """Slots whose child from image `generation` is up and not on its way out."""
        return {c.slot for c in self.running() if c.up and not c.retiring and c.generation == generation}

    def occupied(self) -> set[str]:
        return {child.slot for child in self.every()}

    def request(self, image: Image, slot: Slot, beat_interval: float) -> Child | None:
        """Ask `image` for a child in `slot`; the pending record, or None if the image is unreachable."""
        beat_r, beat_w = os.pipe()
        os.set_blocking(beat_r, False)
        request = image.request_spawn(slot.name, slot.group.name, slot.index, beat_w, beat_interval)
        os.close(beat_w)
        if request is None:
            os.close(beat_r)
            return None
        now = time.monotonic()
        child = Child(slot=slot.name, group=slot.group.name, generation=image.generation, heartbeat_fd=beat_r,
                      started_at=now, last_beat=now, image=image, request=request)
        self.pending.append(child)
        self.by_fd[beat_r] = child
        self.poller.register(beat_r, select.POLLIN)
        return child

    def take_pending(self, image: Image, request: int) -> Child | None:
        """The pending child of `image`'s `request` (the image answered, or the master gave up on it)."""
        image.answered(request)
        for child in self.pending:
            if child.image is image and child.request == request:
                self.pending.remove(child)
                child.image = None
                return child
        return None

    def adopt(self, child: Child, pid: int) -> None:
        child.pid = pid
        self.by_pid[pid] = child

    def drop_pending(self, image: Image) -> None:
        """Forget what `image` never answered; a child it forked anyway finds its pipe broken and exits."""
        for child in [c for c in self.pending if c.image is image]:
            self.pending.remove(child)
            self.forget_pipe(child, close=True)
        image.forget_requests()

    def note_unknown_exit(self, pid: int, code: int, now: float) -> None:
        """A child reaped before its image told us its pid (or a stray grandchild): kept for 30 s."""
        self.unknown_exits = {p: v for p, v in self.unknown_exits.items() if now - v[1] < 30}
        self.unknown_exits[pid] = (code, now)

    def take_unknown_exit(self, pid: int) -> int | None:
        """The exit code of `pid` if it was reaped before its image told us its pid (and forget it)."""
        known = self.unknown_exits.pop(pid, None)
        return None if known is None else known[0]

    def remove(self, pid: int) -> Child:
        child = self.by_pid.pop(pid)
        self.forget_pipe(child, close=True)
        return child

    def read(self, fd: int, now: float) -> None:
        child = self.by_fd[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            # The child closed its end (it is exiting). Stop polling the fd, or poll() would report it
            # readable forever; it is closed when the child is reaped.
            self.forget_pipe(child, close=False)
            return
        child.last_beat = now
        if not child.up:
            child.up = True
            self.log.debug("%s is up", child.describe())
        reports, child.buffer = read_reports(child.buffer, data)
        if reports:
            child.report, child.report_at, child.working = reports[-1], now, True

    def forget_pipe(self, child: Child, *, close: bool) -> None:
        if self.by_fd.pop(child.heartbeat_fd, None) is not None:
            self.poller.unregister(child.heartbeat_fd)
        if close and child.heartbeat_fd >= 0:
            os.close(child.heartbeat_fd)
            child.heartbeat_fd = -1

    def close_all(self) -> None:
        for child in self.every():
            self.forget_pipe(child, close=True)
        self.by_pid.clear()
        self.pending.clear()
