"""The prefork master: keeps one child process in every slot of a plan.

The master is a single-threaded loop. It sleeps in poll() on a self-pipe and on one heartbeat pipe per
child; signal handlers only queue the signal and write a byte to the self-pipe, and all the work
happens in the loop, one method per signal. Each turn of the loop:

    handle queued signals -> reap exited children -> kill children that missed their heartbeats
    -> kill retired children past their grace -> fork children for empty slots -> sd_notify

Slots
    A plan names slots ("consumer default#1", "scheduler"). A slot holds at most one child at a time,
    retiring or not; a replacement is forked only after the old child has been reaped. This is what
    keeps a queue's concurrency from being exceeded during a reload.

Restarts
    A child that exits is replaced at once, unless it died young: it lived less than `min_uptime`,
    failed (non-zero exit or a signal), and the master had not asked it to go. Then its slot waits
    `backoff_base * 2**(n-1)` seconds (at most `backoff_cap`), n being the slot's count of young
    deaths in a row; at `max_consecutive_failures` the master gives up (fast stop, EXIT_CRASHING). A
    child that lives `min_uptime` resets its slot's count. A child killed for missing its heartbeats
    is judged the same way: hanging is failing.

Signals
    TERM, INT   graceful stop: TERM to every child, wait up to `graceful_timeout`, then SIGKILL
    2nd TERM/INT, QUIT   fast stop: SIGKILL every child now
    HUP         reload: call load_plan() again and retire every child (TERM, graceful); each slot of
                the new plan gets a new child as soon as its old one has gone. A failing load_plan()
                keeps everything as it is. Sizes changed by TTIN/TTOU are discarded: the new plan
                is taken as it comes.
    USR1        reopen log files: call reopen_logs() and pass USR1 on to the children
    TTIN, TTOU  one slot more / less in every scalable group (never below one); the removed slot is
                the highest-numbered, its child is retired gracefully
    CHLD        wakes the loop to reap
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from dataclasses import dataclass
from typing import Callable

from setproctitle import setproctitle

from .child import ChildContext, run_child
from .exitcodes import EXIT_CONFIG, EXIT_CRASHING, EXIT_OK, EXIT_PIDFILE
from .pidfile import Pidfile, PidfileHeld
from .plan import Plan, PlanError, Slot
from .sdnotify import Notifier

GRACEFUL = "graceful"
FAST = "fast"


@dataclass(eq=False)
class Child:
    """The master's record of one forked child."""

    pid: int
    slot: str
    group: str
    generation: int  # the reload the child was forked in; READY after HUP waits for the current one
    heartbeat_fd: int
    started_at: float
    last_beat: float
    up: bool = False  # has sent a heartbeat: its body is running, not just forked
    retiring: bool = False  # asked to go (reload, TTOU, stop): its exit is no failure
    retire_deadline: float | None = None
    killed: str | None = None  # why the master SIGKILLed it, if it did

    def describe(self) -> str:
        return f"{self.slot} (pid {self.pid})"


@dataclass
class SlotState:
    failures: int = 0  # young deaths in a row
    next_start: float = 0.0  # monotonic time before which the slot stays empty (backoff)


class Arbiter:
    SIGNALS = (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
        signal.SIGUSR1,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGCHLD,
    )
    # Sleeping longer would make deadlines (heartbeats, graceful timeout) sloppy.
    LOOP_TIMEOUT = 1.0

    def __init__(
        self,
        load_plan: Callable[[], Plan],
        *,
        title: str = "master",
        proc_name: str = "carrot-supervisor",
        graceful_timeout: float = 30.0,
        heartbeat_timeout: float = 60.0,
        pidfile: str | None = None,
        reopen_logs: Callable[[], None] | None = None,
        min_uptime: float = 5.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_consecutive_failures: int = 10,
        logger: logging.Logger | None = None,
        on_fork: Callable[[], None] | None = None,
    ) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be > 0")
        if max_consecutive_failures < 1:
            raise ValueError("max_consecutive_failures must be >= 1")
        self.load_plan = load_plan
        self.title = title
        self.proc_name = proc_name
        self.graceful_timeout = graceful_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.pidfile_path = pidfile
        self.reopen_logs = reopen_logs
        self.min_uptime = min_uptime
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_consecutive_failures = max_consecutive_failures
        self.log = logger or logging.getLogger("supervisor")
        self.on_fork = on_fork

        self.pid = 0
        self.plan = Plan(())
        self.slots: list[Slot] = []
        self.slot_states: dict[str, SlotState] = {}
        self.children: dict[int, Child] = {}
        self.beat_fds: dict[int, Child] = {}
        self.generation = 0
        self.restarts = 0
        self.signal_queue: list[int] = []
        self.stopping: str | None = None
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.awaiting_ready = True
        self.ready_wait_started = 0.0
        self.reloading = False
        self.last_status = ""
        self.next_watchdog = 0.0
        self.wake_r = self.wake_w = -1
        self.poller: select.poll | None = None
        self.notifier = Notifier({}, logger=self.log)  # the real one is made in run(): see there
        self.pidfile: Pidfile | None = None
        self.saved_handlers: dict[int, object] = {}
        self.saved_wakeup_fd: int | None = None

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped; return a code from supervisor.exitcodes.

        Call it from the main thread (signal handlers can only be installed there). It never calls
        sys.exit(); children never return from it.
        """
        self.pid = os.getpid()
        # Read NOTIFY_SOCKET/WATCHDOG_PID now, not in __init__: the caller may have forked in between.
        self.notifier = Notifier(logger=self.log)
        setproctitle(f"{self.proc_name}: {self.title}")
        if self.pidfile_path:
            self.pidfile = Pidfile(self.pidfile_path, logger=self.log)
            try:
                self.pidfile.acquire()
            except PidfileHeld as exc:
                self.log.error("%s; not starting", exc)
                self.pidfile = None
                return EXIT_PIDFILE
            except OSError as exc:
                self.log.error("cannot write pidfile %s: %s; not starting", self.pidfile_path, exc)
                self.pidfile = None
                return EXIT_PIDFILE
        try:
            # Signals first: a TERM that arrives while a slow load_plan() runs is queued, not fatal.
            self.init_wake_pipe()
            self.install_signals()
            try:
                plan = self.load_plan()
                if not isinstance(plan, Plan):
                    raise PlanError(f"load_plan() returned {plan!r}, not a Plan")
            except Exception as exc:
                self.log.exception("cannot load the plan: %s", exc)
                return EXIT_CONFIG
            self.set_plan(plan, fresh=True)
            self.ready_wait_started = time.monotonic()
            self.log.info(
                "master %d starting %d children: %s", self.pid, len(self.slots), self.describe_plan()
            )
            self.main_loop()
            return self.exit_code
        finally:
            self.cleanup()

    def main_loop(self) -> None:
        if self.notifier.watchdog_interval:
            self.next_watchdog = time.monotonic()
        while True:
            self.handle_signals()
            self.reap_children()
            if self.stopping:
                if not self.children:
                    break
                self.kill_stragglers()
            else:
                self.murder_unresponsive()
                self.murder_retirees()
                self.spawn_children()
                self.check_ready()
            self.notify_watchdog()
            self.update_status()
            self.sleep()
        self.log.info("master %d stopped (exit code %d)", self.pid, self.exit_code)

    def sleep(self) -> None:
        """Wait for a signal, a heartbeat or the next deadline, and collect the heartbeats."""
        assert self.poller is not None
        events = self.poller.poll(self.sleep_timeout() * 1000)
        now = time.monotonic()
        for fd, _mask in events:
            if fd == self.wake_r:
                self.drain_wake_pipe()
            elif fd in self.beat_fds:
                self.record_heartbeat(self.beat_fds[fd], now)

    def sleep_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + self.LOOP_TIMEOUT]
        if self.notifier.watchdog_interval:
            deadlines.append(self.next_watchdog)
        if self.stopping == GRACEFUL:
            deadlines.append(self.stop_deadline)
        if not self.stopping:
            occupied = {child.slot for child in self.children.values()}
            deadlines.extend(
                self.slot_states[slot.name].next_start for slot in self.slots if slot.name not in occupied
            )
            deadlines.extend(c.retire_deadline for c in self.children.values() if c.retire_deadline)
            deadlines.extend(
                c.last_beat + self.heartbeat_timeout for c in self.children.values() if not c.killed
            )
        return max(0.0, min(deadlines) - now)

    # -- signals -----------------------------------------------------------------------------------

    def init_wake_pipe(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller = select.poll()
        self.poller.register(self.wake_r, select.POLLIN)

    def install_signals(self) -> None:
        for signum in self.SIGNALS:
            self.saved_handlers[signum] = signal.signal(signum, self.signal_received)
        # CPython runs a Python signal handler between two bytecodes, not when the signal arrives: a
        # signal (a child's SIGCHLD) landing after the loop's last check but before poll() blocks had
        # its handler, and so its wake-up byte, deferred until poll() timed out, a whole LOOP_TIMEOUT
        # later (found by a test: a fast stop now and then reaped its last child 1 s late). The wakeup
        # fd is written by the C-level handler at once.
        self.saved_wakeup_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def signal_received(self, signum: int, frame: object) -> None:
        # CHLD only needs the loop awake; queueing one per exit would flood the queue on mass exits.
        if signum != signal.SIGCHLD:
            self.signal_queue.append(signum)
        self.wakeup()

    def wakeup(self) -> None:
        try:
            os.write(self.wake_w, b".")
        except (BlockingIOError, OSError):
            pass  # a full pipe will wake the loop anyway

    def drain_wake_pipe(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            name = signal.Signals(signum).name
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
        self.notifier.reloading()
        started = time.monotonic()
        try:
            plan = self.load_plan()
            if not isinstance(plan, Plan):
                raise PlanError(f"load_plan() returned {plan!r}, not a Plan")
        except Exception as exc:
            self.log.error("reload failed: %s; keeping the running children", _one_line(exc))
            self.log.debug("reload failure", exc_info=True)
            if not self.awaiting_ready:  # otherwise the READY=1 still owed will follow
                self.notifier.ready(self.status_line())
            return
        self.generation += 1
        old = list(self.children.values())
        self.log.info(
            "reloading: retiring %d children, new plan: %s", len(old), self.describe_plan(plan)
        )
        self.set_plan(plan, fresh=True)
        for child in old:
            self.retire_child(child)
        self.awaiting_ready = True
        self.reloading = True
        self.ready_wait_started = started

    def handle_usr1(self) -> None:
        if self.reopen_logs is not None:
            try:
                self.reopen_logs()
            except Exception:
                self.log.exception("reopening logs failed")
        self.kill_children(signal.SIGUSR1)

    def handle_ttin(self) -> None:
        self.scale(+1)

    def handle_ttou(self) -> None:
        self.scale(-1)

    def scale(self, delta: int) -> None:
        if self.stopping:
            self.log.info("ignoring %s: stopping", "TTIN" if delta > 0 else "TTOU")
            return
        plan = self.plan.scaled(delta)
        changes = [
            f"{old.name} {old.size} -> {new.size}"
            for old, new in zip(self.plan.groups, plan.groups)
            if old.size != new.size
        ]
        if not changes:
            self.log.info("no scalable group can change size by %+d", delta)
            return
        self.log.info("scaling: %s", ", ".join(changes))
        self.set_plan(plan, fresh=False)
        wanted = {slot.name for slot in self.slots}
        for child in list(self.children.values()):
            if child.slot not in wanted:
                self.retire_child(child)

    # -- stopping ----------------------------------------------------------------------------------

    def stop_gracefully(self) -> None:
        self.stopping = GRACEFUL
        self.stop_deadline = time.monotonic() + self.graceful_timeout
        self.notifier.stopping()
        self.log.info(
            "graceful stop: waiting up to %.1fs for %d children", self.graceful_timeout, len(self.children)
        )
        for child in self.children.values():
            child.retiring = True
        self.kill_children(signal.SIGTERM)

    def stop_fast(self) -> None:
        if self.stopping != FAST:
            if not self.stopping:
                self.notifier.stopping()
            self.stopping = FAST
            self.log.info("fast stop: killing %d children", len(self.children))
        for child in self.children.values():
            child.retiring = True
            if not child.killed:
                self.kill_child(child, signal.SIGKILL, "fast stop")

    def kill_stragglers(self) -> None:
        if self.stopping != GRACEFUL or time.monotonic() < self.stop_deadline:
            return
        for child in self.children.values():
            self.log.warning(
                "%s still running %.1fs after TERM; killing", child.describe(), self.graceful_timeout
            )
            self.kill_child(child, signal.SIGKILL, "graceful timeout")
        self.stopping = FAST

    # -- children ----------------------------------------------------------------------------------

    def set_plan(self, plan: Plan, *, fresh: bool) -> None:
        """Make `plan` the one to fill. `fresh` forgets backoff and failure counts (a reload)."""
        self.plan = plan
        self.slots = plan.slots()
        old_states = {} if fresh else self.slot_states
        self.slot_states = {slot.name: old_states.get(slot.name) or SlotState() for slot in self.slots}

    def spawn_children(self) -> None:
        now = time.monotonic()
        occupied = {child.slot for child in self.children.values()}
        for slot in self.slots:
            if slot.name not in occupied and self.slot_states[slot.name].next_start <= now:
                self.spawn_child(slot)

    def spawn_child(self, slot: Slot) -> None:
        beat_r, beat_w = os.pipe()
        os.set_blocking(beat_r, False)
        os.set_blocking(beat_w, False)
        ctx = ChildContext(
            slot=slot.name,
            group=slot.group.name,
            index=slot.index,
            master_pid=self.pid,
            proc_name=self.proc_name,
            heartbeat_fd=beat_w,
            beat_interval=min(1.0, self.heartbeat_timeout / 10),
        )
        inherited = [self.wake_r, self.wake_w, beat_r, *(c.heartbeat_fd for c in self.children.values())]
        if self.notifier.fileno() is not None:
            inherited.append(self.notifier.fileno())
        sigmask = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
            os.close(beat_r)
            os.close(beat_w)
            delay = min(self.backoff_cap, 1.0)
            self.slot_states[slot.name].next_start = time.monotonic() + delay
            self.log.error("cannot fork a child for %s: %s; trying again in %.1fs", slot.name, exc, delay)
            return
        if pid == 0:
            try:
                run_child(
                    ctx,
                    slot.group.target,
                    close_fds=inherited,
                    sigmask=sigmask,
                    reopen_logs=self.reopen_logs,
                    on_fork=self.on_fork,
                    logger=self.log,
                )
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
        os.close(beat_w)
        now = time.monotonic()
        child = Child(
            pid=pid,
            slot=slot.name,
            group=slot.group.name,
            generation=self.generation,
            heartbeat_fd=beat_r,
            started_at=now,
            last_beat=now,
        )
        self.children[pid] = child
        self.beat_fds[beat_r] = child
        assert self.poller is not None
        self.poller.register(beat_r, select.POLLIN)
        self.log.info("spawned %s", child.describe())

    def record_heartbeat(self, child: Child, now: float) -> None:
        try:
            data = os.read(child.heartbeat_fd, 4096)
        except BlockingIOError:
            return
        if not data:
            # The child closed its end (it is exiting). Stop polling the fd, or poll() would report
            # it readable forever; it is closed when the child is reaped.
            self.forget_heartbeat_pipe(child, close=False)
            return
        child.last_beat = now
        if not child.up:
            child.up = True
            self.log.debug("%s is up", child.describe())

    def forget_heartbeat_pipe(self, child: Child, *, close: bool) -> None:
        if self.beat_fds.pop(child.heartbeat_fd, None) is not None and self.poller is not None:
            self.poller.unregister(child.heartbeat_fd)
        if close and child.heartbeat_fd >= 0:
            os.close(child.heartbeat_fd)
            child.heartbeat_fd = -1

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                self.log.debug("reaped pid %d, not one of our children", pid)
                continue
            self.forget_heartbeat_pipe(child, close=True)
            self.child_exited(child, os.waitstatus_to_exitcode(status))

    def child_exited(self, child: Child, code: int) -> None:
        now = time.monotonic()
        uptime = now - child.started_at
        how = f"exit code {code}" if code >= 0 else f"signal {_signal_name(-code)}"
        self.log.log(
            logging.INFO if code == 0 else logging.WARNING,
            "%s exited with %s after %.1fs",
            child.describe(),
            how,
            uptime,
        )
        state = self.slot_states.get(child.slot)
        if self.stopping or state is None:
            return  # nothing to refill: the master is stopping, or the slot left the plan
        if child.retiring:
            return  # its slot is refilled with a new child right away (new code after a reload)
        self.restarts += 1
        if uptime >= self.min_uptime:
            state.failures = 0
            return
        if code == 0:
            return
        state.failures += 1
        if state.failures >= self.max_consecutive_failures:
            self.log.error(
                "slot %s died young %d times in a row (last: %s after %.1fs); giving up",
                child.slot,
                state.failures,
                how,
                uptime,
            )
            self.exit_code = EXIT_CRASHING
            self.stop_fast()
            return
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (state.failures - 1))
        state.next_start = now + delay
        self.log.warning(
            "slot %s keeps dying young (%d consecutive); next start in %.1fs", child.slot, state.failures, delay
        )

    def retire_child(self, child: Child) -> None:
        if child.retiring:
            return
        child.retiring = True
        child.retire_deadline = time.monotonic() + self.graceful_timeout
        self.kill_child(child, signal.SIGTERM)

    def murder_unresponsive(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            silent = now - child.last_beat
            if not child.killed and silent > self.heartbeat_timeout:
                self.log.warning("%s missed heartbeats for %.0fs; killing", child.describe(), silent)
                self.kill_child(child, signal.SIGKILL, "missed heartbeats")

    def murder_retirees(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.retire_deadline and not child.killed and now >= child.retire_deadline:
                self.log.warning(
                    "%s still running %.1fs after it was retired; killing", child.describe(), self.graceful_timeout
                )
                self.kill_child(child, signal.SIGKILL, "retirement timeout")

    def kill_children(self, signum: int) -> None:
        for child in list(self.children.values()):
            self.kill_child(child, signum)

    def kill_child(self, child: Child, signum: int, reason: str | None = None) -> None:
        if signum == signal.SIGKILL:
            child.killed = reason or "killed"
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass  # already gone; the reaper will see it

    # -- readiness and status ----------------------------------------------------------------------

    def check_ready(self) -> None:
        if not self.awaiting_ready:
            return
        up = {
            c.slot for c in self.children.values() if c.up and not c.retiring and c.generation == self.generation
        }
        if any(slot.name not in up for slot in self.slots):
            return
        elapsed = time.monotonic() - self.ready_wait_started
        if self.reloading:
            self.log.info("reload done in %.2fs", elapsed)
        else:
            self.log.info("ready: %d children up in %.2fs", len(self.slots), elapsed)
        self.awaiting_ready = False
        self.reloading = False
        self.last_status = self.status_line()
        self.notifier.ready(self.last_status)

    def status_line(self) -> str:
        if self.stopping:
            return f"stopping: {len(self.children)} children left"
        per_group: dict[str, int] = {group.name: 0 for group in self.plan.groups}
        for child in self.children.values():
            if child.up and not child.retiring:
                per_group[child.group] = per_group.get(child.group, 0) + 1
        counts = ", ".join(f"{name}: {n}" for name, n in per_group.items())
        line = f"{sum(per_group.values())} children up ({counts}); {self.restarts} restarts"
        return f"reloading; {line}" if self.reloading else line

    def update_status(self) -> None:
        line = self.status_line()
        if line != self.last_status:
            self.last_status = line
            self.notifier.status(line)

    def notify_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if not interval:
            return
        now = time.monotonic()
        if now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + interval

    def describe_plan(self, plan: Plan | None = None) -> str:
        plan = plan or self.plan
        return ", ".join(f"{group.name} x{group.size}" for group in plan.groups) or "no groups"

    # -- cleanup -----------------------------------------------------------------------------------

    def cleanup(self) -> None:
        if self.children:
            # Only reached when the loop died of a bug: do not leave children behind.
            self.log.error("master leaving with %d children; killing them", len(self.children))
            for child in list(self.children.values()):
                self.kill_child(child, signal.SIGKILL, "master exiting")
            for pid in list(self.children):
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                self.forget_heartbeat_pipe(self.children.pop(pid), close=True)
        if self.saved_wakeup_fd is not None:
            signal.set_wakeup_fd(self.saved_wakeup_fd)
            self.saved_wakeup_fd = None
        for signum, handler in self.saved_handlers.items():
            # None means a handler installed outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # type: ignore[arg-type]
        self.saved_handlers.clear()
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1
        self.poller = None
        self.notifier.close()
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
