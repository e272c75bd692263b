"""The prefork master: keeps one child process in every slot of the plan its image serves.

A single-threaded loop that blocks only in poll(): on its self-pipe (signals), one heartbeat pipe per
child and one control channel per image. Each turn:

    handle queued signals -> reap -> read the images -> kill hung and retired children
    -> ask the image for children for empty slots -> READY / STATUS / WATCHDOG -> status snapshot

Images (image.py the image process, images.py the master's handles on them, protocol.py what they say
to each other): the master never imports the application. An image per settings generation builds
the plan and forks the children on request. HUP (or a dead image) starts a new image while everything
runs on; once it is ready the old one is retired and every older child retired (TERM, SIGKILL after
`graceful_timeout`), each slot refilled from the new image as soon as its old child is gone, so a slot
never holds two. If the new image fails, the old image and all children stay and the log says why.
A HUP while an image builds supersedes it.

Restarts (restarts.py): a child that fails young makes its slot back off; a slot that keeps failing is
parked (retried about once a minute); the master gives up (EXIT_CRASHING) only when every slot is parked.
A child silent for `heartbeat_timeout` gets SIGABRT (faulthandler: its stacks reach the log), then SIGKILL.

Signals: TERM/INT graceful stop (SIGKILL after `graceful_timeout`); a second TERM/INT or QUIT: fast
stop; HUP reload; USR1 reopen logs (passed on to the children); TTIN/TTOU one slot more/less in every
scalable group; CHLD wakes the loop to reap.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import stat
import time
from typing import Callable

from .children import Child, ChildTable
from .exitcodes import EXIT_CONFIG, EXIT_CRASHING, EXIT_OK, EXIT_PIDFILE
from .image import Build
from .images import Image, ImageSet, start_image
from .pidfile import Pidfile
from .plan import Plan, Slot
from .procs import (become_subreaper, child_pids, describe_exit, describe_pid, kill_and_reap, kill_tree, reaped,
                    set_title, signal_name)
from .protocol import Eof, Failed, Ready, Spawned, SpawnFailed
from .readiness import Readiness
from .restarts import RestartPolicy, SlotBook
from .sdnotify import Notifier
from .signals import MASTER_SIGNALS, SignalQueue
from .status import ChildView, ImageView, SlotView, StatusFile, StatusView, snapshot, status_line

GRACEFUL = "graceful"
FAST = "fast"
ABORT_GRACE = 2.0  # seconds between SIGABRT (stacks to the log) and SIGKILL for a hung child
STRAY_GRACE = 10.0  # seconds an unknown process adopted by the master lives before it is killed
STRAY_SCAN = 1.0  # seconds between two looks for such processes
IMAGE_RETRY = 5.0  # seconds before a replacement for a dead image is tried again after it failed


class Arbiter:
    SIGNALS = (*MASTER_SIGNALS, signal.SIGCHLD)
    LOOP_TIMEOUT = 1.0  # sleeping longer would make deadlines (heartbeats, graceful timeout) sloppy
    OPTIONS = ("graceful_timeout", "heartbeat_timeout", "backoff_cap", "max_consecutive_failures")

    def __init__(self, build: Build, *, title: str = "master", proc_name: str = "carrot-supervisor",
                 graceful_timeout: float = 30.0, heartbeat_timeout: float = 60.0, pidfile: str | None = None,
                 status_file: str | None = None, status_extra: dict | None = None,
                 reopen_logs: Callable[[], None] | None = None, min_uptime: float = 5.0, backoff_base: float = 0.5,
                 backoff_cap: float = 30.0, max_consecutive_failures: int = 10, park_cap: float = 60.0,
                 logger: logging.Logger | None = None, on_fork: Callable[[], None] | None = None) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be > 0")
        self.build = build
        self.title, self.proc_name = title, proc_name
        self.graceful_timeout, self.heartbeat_timeout = graceful_timeout, heartbeat_timeout
        self.min_uptime, self.backoff_base, self.backoff_cap = min_uptime, backoff_base, backoff_cap
        self.max_consecutive_failures, self.park_cap = max_consecutive_failures, park_cap
        self.book = SlotBook(self.restart_policy())
        self.pidfile_path, self.reopen_logs, self.on_fork = pidfile, reopen_logs, on_fork
        self.status_file = StatusFile(status_file) if status_file else None
        self.status_extra = dict(status_extra or {})
        self.log = logger or logging.getLogger("supervisor")

        self.pid = 0
        self.started = time.time()
        self.plan = Plan(())
        self.slots: list[Slot] = []
        self.generation = 0
        self.restarts = 0
        self.stopping: str | None = None
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.signals = SignalQueue(self.SIGNALS)
        self.poller = select.poll()
        self.table = ChildTable(self.poller, self.log)
        self.images = ImageSet(self.poller)
        self.notifier = Notifier({}, logger=self.log)  # the real one is made in run(): see there
        self.readiness = Readiness(self.notifier, self.log)
        self.pidfile: Pidfile | None = None
        self.strays: dict[int, float] = {}  # unknown children of the master (see sweep_strays): first seen
        self.strays_scanned = 0.0

    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(self.min_uptime, self.backoff_base, self.backoff_cap, self.max_consecutive_failures,
                             max(self.park_cap, self.backoff_cap))

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped; return a code from supervisor.exitcodes. Call it from the main thread."""
        self.pid = os.getpid()
        # Read NOTIFY_SOCKET/WATCHDOG_PID now, not in __init__: the caller may have forked in between.
        self.notifier = Notifier(logger=self.log)
        self.readiness = Readiness(self.notifier, self.log)
        self.set_title()
        if self.pidfile_path:
            self.pidfile = Pidfile.take(self.pidfile_path, self.log, proc_name=self.proc_name)
            if self.pidfile is None:
                return EXIT_PIDFILE
        try:
            self.signals.install(self.poller)  # first: a TERM during the first image's build is queued
            become_subreaper()
            self.log.info("master %d starting", self.pid)
            self.warn_shared_directories()
            self.readiness.starting(time.monotonic())
            self.start_image()
            self.main_loop()
            return self.exit_code
        finally:
            self.cleanup()

    def main_loop(self) -> None:
        while True:
            self.handle_signals()
            self.reap()
            self.read_images()
            self.sweep_strays(time.monotonic())
            if self.stopping:
                if not self.table.every() and not self.images:
                    self.sweep_strays(time.monotonic(), final=True)
                    break
                self.kill_stragglers()
            else:
                self.murder_overdue()
                self.replace_dead_image()
                self.spawn_children()
                self.check_ready()
            now = time.monotonic()
            self.readiness.watchdog(now)
            self.update_status(now)
            self.sleep()
        self.log.info("master %d stopped (exit code %d)", self.pid, self.exit_code)

    def sleep(self) -> None:
        """Wait for a signal, a heartbeat, an image's message or the next deadline."""
        events = self.poller.poll(self.sleep_timeout() * 1000)
        now = time.monotonic()
        for fd, _mask in events:
            if fd == self.signals.wake_r:
                self.signals.drain()
            elif fd in self.table.by_fd:
                self.table.read(fd, now)

    def sleep_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + self.LOOP_TIMEOUT, self.readiness.deadline() or now + self.LOOP_TIMEOUT]
        if self.stopping == GRACEFUL:
            deadlines.append(self.stop_deadline)
        if not self.stopping:
            deadlines += [self.book.next_start(s.name) for s in self.slots if s.name not in self.table.occupied()]
            deadlines.append(self.table.next_deadline(now, self.heartbeat_timeout, ABORT_GRACE) or now + 1)
        return max(0.0, min(deadlines) - now)

    # -- signals -----------------------------------------------------------------------------------

    def handle_signals(self) -> None:
        while (signum := self.signals.pop()) is not None:
            name = signal_name(signum)
            self.log.info("received %s", name)
            getattr(self, f"handle_{name[3:].lower()}")()

    def handle_term(self) -> None:
        if self.stopping:
            self.log.info("second stop request: fast stop")
            self.stop_fast()
        else:
            self.stop_gracefully()

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.stop_fast()

    def handle_hup(self) -> None:
        if self.stopping:
            self.log.info("ignoring HUP: stopping")
            return
        self.readiness.reload_started(time.monotonic())
        self.start_image()

    def handle_usr1(self) -> None:
        if self.reopen_logs is not None:
            try:
                self.reopen_logs()
            except Exception:
                self.log.exception("reopening logs failed")
        self.table.signal_all(signal.SIGUSR1)

    def scale(self, delta: int) -> None:
        if self.stopping:
            return
        plan = self.plan.scaled(delta)
        changes = [f"{old.name} {old.size} -> {new.size}" for old, new in zip(self.plan.groups, plan.groups)
                   if old.size != new.size]
        if not changes:
            self.log.info("no scalable group can change size by %+d", delta)
            return
        self.log.info("scaling: %s", ", ".join(changes))
        self.set_plan(plan, fresh=False)
        self.retire_unwanted()

    handle_ttin = functools.partialmethod(scale, +1)
    handle_ttou = functools.partialmethod(scale, -1)

    # -- images ------------------------------------------------------------------------------------

    def start_image(self) -> None:
        if self.images.building is not None:
            self.log.info("%s is superseded by a newer reload; killing it", self.images.building.describe())
            self.images.kill(self.images.building)
        self.generation += 1
        fds = [*self.signals.fds(), *self.table.by_fd, *self.images.fds()]
        if self.notifier.fileno() is not None:
            fds.append(self.notifier.fileno())
        image = start_image(self.build, self.generation, master_pid=self.pid, proc_name=self.proc_name,
                            close_fds=fds, blocked=self.SIGNALS, reopen_logs=self.reopen_logs,
                            on_fork=self.on_fork, logger=self.log)
        self.images.add(image)
        self.log.info("starting %s", image.describe())

    def read_images(self) -> None:
        for image, message in self.images.messages():
            match message:
                case Eof():
                    self.table.drop_pending(image)
                case Ready():
                    self.image_ready(image, message)
                case Failed(error, exit_code):
                    self.image_failed(image, error, exit_code)
                case Spawned(request, pid):
                    self.child_spawned(image, request, pid)
                case SpawnFailed(request, error):
                    self.spawn_failed(image, request, error)

    def image_ready(self, image: Image, message: Ready) -> None:
        if image is not self.images.building:
            return
        try:
            plan = Plan.from_shape(message.groups)
        except Exception as exc:
            self.image_failed(image, f"its plan is unusable: {exc}", EXIT_CONFIG)
            return
        old = self.images.promote(image, plan)
        for name, value in message.options.items():
            if name in self.OPTIONS and value is not None:
                setattr(self, name, value)
        self.book.policy = self.restart_policy()
        self.set_plan(plan, fresh=True)
        outdated = [c for c in self.table.every() if c.generation < image.generation]
        self.log.info("%s is up after %.2fs; %s: %s", image.describe(), time.monotonic() - image.started_at,
                      f"rolling over {len(outdated)} children" if old else "plan", self.plan.describe())
        for child in outdated:
            self.retire_child(child)
        self.retire_unwanted()

    def image_failed(self, image: Image, error: str, exit_code: int) -> None:
        if not self.images.fail(image, error):
            return  # superseded by a newer reload: nothing waits for it
        if self.images.serving is None and not self.readiness.ready_sent and not len(self.table):
            self.log.error("%s; not starting", error)
            self.exit_code = exit_code
            self.stop_fast()
        elif self.images.serving is None:
            self.log.error("no image: %s; keeping the running children, trying again in %.0fs", error, IMAGE_RETRY)
            self.images.retry_from(time.monotonic() + IMAGE_RETRY)
        else:
            self.log.error("reload failed: %s; keeping the running children", error)
            self.readiness.reload_failed(status_line(self.view()))

    def image_exited(self, image: Image, code: int) -> None:
        self.table.drop_pending(image)
        if image.state == "starting":
            how = describe_exit(code)
            self.image_failed(image, f"{image.describe()} exited with {how} while starting", EXIT_CONFIG)
        elif image is self.images.serving and not self.stopping:
            self.log.warning("%s exited with %s; starting a new image", image.describe(), describe_exit(code))
            self.images.serving_died(time.monotonic())

    def replace_dead_image(self) -> None:
        if self.images.replacement_due(time.monotonic()):
            self.start_image()

    # -- children ----------------------------------------------------------------------------------

    def set_plan(self, plan: Plan, *, fresh: bool) -> None:
        """Make `plan` the one to fill. `fresh` forgets backoff and failure counts (a new image)."""
        self.plan, self.slots = plan, plan.slots()
        self.book.reset([slot.name for slot in self.slots], fresh=fresh,
                        auxiliary=[slot.name for slot in self.slots if slot.group.auxiliary])

    def retire_unwanted(self) -> None:
        wanted = {slot.name for slot in self.slots}
        for child in self.table.every():
            if child.slot not in wanted:
                self.retire_child(child)

    def spawn_children(self) -> None:
        image = self.images.serving
        if image is None or image.state != "up" or image.fileno() < 0:
            return
        now, occupied = time.monotonic(), self.table.occupied()
        for slot in self.slots:
            if slot.name in occupied or self.book.next_start(slot.name) > now:
                continue
            if self.table.request(image, slot, min(1.0, self.heartbeat_timeout / 10)) is None:
                self.book.hold(slot.name, now + 1.0)
                self.log.error("cannot ask %s for a child for %s; trying again in 1s", image.describe(), slot.name)

    def child_spawned(self, image: Image, request: int, pid: int) -> None:
        child = self.table.take_pending(image, request)
        if child is None:  # its slot was given up meanwhile: the master never wanted this child
            os.kill(pid, signal.SIGKILL)
            return
        self.table.adopt(child, pid)
        self.log.info("spawned %s", child.describe())
        if (code := self.table.take_unknown_exit(pid)) is not None:  # it died before we heard of it
            self.child_exited(self.table.remove(pid), code)
        elif self.stopping == FAST:
            self.table.signal(child, signal.SIGKILL, "fast stop")
        elif child.retiring:  # retired before its pid was known
            self.table.signal(child, signal.SIGTERM)

    def spawn_failed(self, image: Image, request: int, error: str) -> None:
        child = self.table.take_pending(image, request)
        if child is not None:
            self.table.forget_pipe(child, close=True)
            self.book.hold(child.slot, time.monotonic() + 1.0)
            self.log.error("%s could not fork a child for %s: %s", image.describe(), child.slot, error)

    def reap(self) -> None:
        for pid, code in reaped():
            if pid in self.images.by_pid:
                self.read_images()  # what it said before it went (its failure, a child's pid) comes first
                self.image_exited(self.images.forget(pid), code)
            elif pid in self.table.by_pid:
                self.child_exited(self.table.remove(pid), code)
            else:
                self.table.note_unknown_exit(pid, code, time.monotonic())

    def child_exited(self, child: Child, code: int) -> None:
        now = time.monotonic()
        uptime, how = now - child.started_at, describe_exit(code)
        self.log.log(logging.INFO if code == 0 else logging.WARNING, "%s exited with %s after %.1fs",
                     child.describe(), how, uptime)
        if self.stopping or child.retiring or child.slot not in self.book:
            return  # nothing to refill now, or a new child (new code) comes at once
        self.restarts += 1
        verdict, level, message = self.book.record_exit(child.slot, uptime=uptime, code=code, how=how,
                                                        was_working=child.working, now=now)
        if message:
            self.log.log(level, message)
        if verdict.parked and self.book.all_parked():
            self.log.error("every slot is parked: children kept crashing; giving up")
            self.exit_code = EXIT_CRASHING
            self.stop_fast()

    def retire_child(self, child: Child) -> None:
        self.table.retire(child, time.monotonic() + self.graceful_timeout)

    def murder_overdue(self) -> None:
        """SIGABRT then SIGKILL for the silent; SIGKILL for the retired past their graceful timeout."""
        now = time.monotonic()
        for child in self.table.running():
            why = child.overdue(now, self.heartbeat_timeout, ABORT_GRACE)
            if why == "retired":
                self.log.warning("%s still running %.1fs after it was retired; killing", child.describe(),
                                 self.graceful_timeout)
                self.table.signal(child, signal.SIGKILL, "retirement timeout")
            elif why == "silent":
                self.log.warning("%s missed heartbeats for %.0fs; killing (SIGABRT: its stacks go to the log; "
                                 "SIGKILL in %.0fs)", child.describe(), now - child.last_beat, ABORT_GRACE)
                self.table.abort(child, now)
            elif why == "hung":
                self.table.signal(child, signal.SIGKILL, "missed heartbeats")
        for child in list(self.table.pending):
            image = child.image
            if now - child.started_at > self.heartbeat_timeout and image is not None:
                self.spawn_failed(image, child.request or 0, "no answer from the image")
                if image is self.images.serving and image.state == "up":  # hung (stopped, deadlocked)
                    self.log.warning("%s is hung; killing it (a new image replaces it)", image.describe())
                    self.images.kill(image)

    def warn_shared_directories(self) -> None:
        """A pidfile or status file in a directory other users can write (/tmp, a shared project folder):
        the master never writes through a link planted there (exclusive creates of unpredictable names,
        then rename), but whoever can write there can still remove or replace those files. Said once, at
        start, with the fix."""
        warned = set()
        paths = (("pidfile", self.pidfile_path), ("status file", self.status_file.path if self.status_file else None))
        for what, path in paths:
            if not path:
                continue
            directory = os.path.dirname(os.path.abspath(path))
            try:
                mode = os.stat(directory).st_mode
            except OSError:
                continue
            if directory in warned or not mode & stat.S_IWOTH:
                continue
            warned.add(directory)
            self.log.warning("the %s directory %s is writable by other users%s: they can remove or replace the "
                             "%s (carrot never writes through a link planted there). Keep it in a directory only "
                             "this user can write, such as /run/carrot (systemd: RuntimeDirectory=carrot)", what,
                             directory, " (sticky)" if mode & stat.S_ISVTX else "", what)

    def sweep_strays(self, now: float, final: bool = False) -> None:
        """Kill the processes the master adopted that are none of its images or children: what a task
        started and its child left behind when it died (the master is a subreaper, so they become its
        children). Nothing a task starts outlives its slot, nor the master. An unknown child is given
        STRAY_GRACE first (a child the image has just forked is the master's before the image names it);
        at the end of a stop (`final`) none is."""
        if not final and now - self.strays_scanned < STRAY_SCAN:
            return
        self.strays_scanned = now
        for _ in range(10 if final else 1):
            known = set(self.table.by_pid) | set(self.images.by_pid)
            unknown = [pid for pid in child_pids(self.pid or None) if pid not in known]
            self.strays = {pid: self.strays.get(pid, now) for pid in unknown}
            due = [pid for pid, seen in self.strays.items() if final or now - seen >= STRAY_GRACE]
            if not due:
                return
            for pid in due:
                self.log.warning("killing %s: a process left behind by a child that is gone", describe_pid(pid))
                kill_tree(pid)
                self.strays.pop(pid, None)
            if final:
                time.sleep(0.05)
                for pid, code in reaped():
                    self.table.note_unknown_exit(pid, code, time.monotonic())

    # -- stopping ----------------------------------------------------------------------------------

    def stop_gracefully(self) -> None:
        self.stopping = GRACEFUL
        self.stop_deadline = time.monotonic() + self.graceful_timeout
        self.notifier.stopping()
        self.log.info("graceful stop: waiting up to %.1fs for %d children", self.graceful_timeout,
                      len(self.table))
        self.table.mark_retiring()
        self.table.signal_all(signal.SIGTERM)
        self.images.kill_all()

    def stop_fast(self) -> None:
        if self.stopping != FAST:
            if not self.stopping:
                self.notifier.stopping()
            self.stopping = FAST
            self.log.info("fast stop: killing %d children", len(self.table))
        self.table.mark_retiring()
        self.table.kill_all("fast stop")
        self.images.kill_all()

    def kill_stragglers(self) -> None:
        if self.stopping != GRACEFUL or time.monotonic() < self.stop_deadline:
            return
        for child in self.table.running():
            self.log.warning("%s still running %.1fs after TERM; killing", child.describe(), self.graceful_timeout)
        self.stop_fast()

    # -- readiness and status ----------------------------------------------------------------------

    def check_ready(self) -> None:
        for message in self.book.note_working(self.table.running(), time.monotonic()):
            self.log.info(message)
        if self.images.serving is None or self.images.building is not None or not self.readiness.awaiting:
            return  # nothing to serve yet, or a reload's image still building
        up = self.table.up_slots(self.images.serving.generation)
        if all(slot.name in up for slot in self.slots):
            self.readiness.all_up(time.monotonic(), len(self.slots), status_line(self.view()))

    def update_status(self, now: float) -> None:
        view = self.view()
        line = status_line(view)
        if line != self.readiness.last_status:
            self.set_title(f"parked: {', '.join(view.parked)}" if view.parked else "")
        self.readiness.status(line)
        if self.status_file is not None:
            self.status_file.update(snapshot(view, now))

    def view(self) -> StatusView:
        """A frozen copy of what the status document and line show, taken now."""
        image = self.images.building or self.images.serving
        return StatusView(
            pid=self.pid, started=self.started, stopping=bool(self.stopping), reloading=self.readiness.reloading,
            ready=self.readiness.ready_sent, restarts=self.restarts,
            generation=self.images.serving.generation if self.images.serving else 0,
            image=ImageView(image.pid, image.generation, image.state, image.error) if image else None,
            groups=tuple(group.name for group in self.plan.groups),
            slots=tuple(self.slot_view(slot) for slot in self.slots),
            children=tuple(ChildView(c.slot, c.group, c.pid, c.generation, c.up, c.retiring, c.report, c.report_at)
                           for c in self.table.every()),
            parked=tuple(self.book.parked()), extra=dict(self.status_extra))

    def slot_view(self, slot: Slot) -> SlotView:
        record = self.book.records[slot.name]
        return SlotView(slot.name, slot.group.name, record.restarts, record.failures, record.parked,
                        record.next_start, record.problem)

    def set_title(self, state: str = "") -> None:
        set_title(f"{self.proc_name}: {self.title}" + (f" [{state}]" if state else ""))

    # -- cleanup -----------------------------------------------------------------------------------

    def cleanup(self) -> None:
        if self.table.by_pid or self.images.by_pid:  # only when the loop died of a bug: leave nothing behind
            self.log.error("master leaving with processes; killing them")
            kill_and_reap([*self.table.by_pid, *self.images.by_pid])
        self.table.close_all()
        self.images.close_all()
        self.signals.restore()
        self.notifier.close()
        if self.status_file is not None:
            self.status_file.remove()
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
