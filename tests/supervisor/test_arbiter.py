"""The supervisor as a user meets it: a real master process, real signals, real children.

Each test starts tests/supervisor/sample_master.py in a subprocess with a unique process name, looks at
the process table with psutil (titles say which slot a child holds), sends signals, and reads the
master's log. Every process a test starts is killed in a finalizer, even when the test fails.

Measured figures are printed (run with -s to see them); only the bounds the spec states are asserted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter

import psutil
import pytest

from tests.harness import wait_for

from supervisor import exitcodes
from supervisor.child import ChildContext
from supervisor.pidfile import Pidfile, PidfileHeld
from supervisor.plan import GroupShape, Plan, PlanError, SlotGroup
from supervisor.sdnotify import Notifier

def group(name, size=1, behaviour="sleep", **extra):
    return {"name": name, "size": size, "behaviour": behaviour, **extra}


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- the loop, titles, restarts ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_children_get_titles_and_idle_master_stops_on_term(start_master):
    master = start_master([group("consumer default", 2), group("consumer reports", 1),
                           group("scheduler", numbered=False)])
    up = master.wait_up({"consumer default#1", "consumer default#2", "consumer reports#1", "scheduler"})

    assert master.title_of(master.pid) == f"{master.proc_name}: master"
    for slot, pid in up.items():
        assert master.title_of(pid) == f"{master.proc_name}: {slot} idle"
        assert psutil.Process(pid).ppid() == master.pid

    master.signal(signal.SIGTERM)
    started = time.monotonic()
    assert master.wait_exit(10) == exitcodes.EXIT_OK
    print(f"\nTERM to exit, idle children: {time.monotonic() - started:.3f}s")
    assert all(gone(pid) for pid in up.values())
    log = master.log()
    for slot, pid in up.items():
        assert f"{slot} (pid {pid}) exited with exit code 0" in log
    assert "received SIGTERM" in log


@pytest.mark.timeout(30)
def test_killed_child_is_replaced_within_a_second(start_master):
    master = start_master([group("consumer default", 2)], min_uptime=0.3)
    up = master.wait_up({"consumer default#1", "consumer default#2"})
    other = up["consumer default#2"]
    figures = []
    for _ in range(3):
        time.sleep(0.5)  # older than min_uptime, so this is an ordinary death, not a young one
        victim = up["consumer default#1"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        def replaced():
            pid = master.by_slot().get("consumer default#1")
            return pid if pid not in (None, victim) else None

        wait_for(replaced, 5, lambda: f"a new child in consumer default#1{master.tail()}", interval=0.002)
        figures.append(time.monotonic() - killed_at)
        up = master.wait_up({"consumer default#1", "consumer default#2"})
        assert up["consumer default#2"] == other
    print(f"\nrespawn after SIGKILL: {', '.join(f'{f * 1000:.0f}ms' for f in figures)}")
    assert max(figures) < 1.0
    assert "exited with signal SIGKILL" in master.log()
    assert "dying young" not in master.log()


@pytest.mark.timeout(40)
def test_crash_looping_slot_backs_off_then_is_parked_and_the_others_run_on(start_master):
    master = start_master([group("consumer steady", 1), group("consumer broken", 1, "crash")],
                          min_uptime=1, backoff_base=0.2, backoff_cap=0.4, max_consecutive_failures=4)
    steady = wait_for(lambda: master.by_slot().get("consumer steady#1"), 10, "the steady child")
    seen_steady = set()
    deadline = time.monotonic() + 15
    while "parked" not in master.log() and time.monotonic() < deadline:
        pid = master.by_slot().get("consumer steady#1")
        if pid:
            seen_steady.add(pid)
        time.sleep(0.02)
    master.wait_log("slot consumer broken#1 died young 4 times in a row")
    time.sleep(0.5)
    assert master.proc.poll() is None  # one parked slot does not stop the master

    log = master.log()
    assert "slot consumer broken#1 keeps dying young (1 consecutive); next start in 0.2s" in log
    assert "slot consumer broken#1 keeps dying young (2 consecutive); next start in 0.4s" in log
    assert "slot consumer broken#1 keeps dying young (3 consecutive); next start in 0.4s" in log
    assert "keeps dying young (4 consecutive)" not in log
    assert "parked: retrying with a backoff of up to 60s" in log
    # The other slot never noticed.
    assert seen_steady == {steady}
    assert master.by_slot()["consumer steady#1"] == steady
    starts = [r["started"] for r in master.records("consumer broken#1")]
    assert len(starts) == 4
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    print(f"\ncrash loop: gaps between starts {', '.join(f'{g:.2f}s' for g in gaps)} (backoff 0.2, 0.4, 0.4)")
    for gap, delay in zip(gaps, (0.2, 0.4, 0.4)):
        assert gap >= delay * 0.9


@pytest.mark.timeout(40)
def test_master_gives_up_when_every_slot_is_parked(start_master):
    master = start_master([group("consumer broken", 2, "crash")], min_uptime=1, backoff_base=0.1,
                          backoff_cap=0.2, max_consecutive_failures=3)
    assert master.wait_exit(20) == exitcodes.EXIT_CRASHING
    log = master.log()
    assert "slot consumer broken#1 died young 3 times in a row" in log
    assert "slot consumer broken#2 died young 3 times in a row" in log
    assert "every slot is parked: children kept crashing; giving up" in log


@pytest.mark.timeout(30)
def test_hung_child_is_killed_and_replaced(start_master):
    master = start_master([group("consumer hang", 1, "hang", after=0.3), group("consumer ok", 1)],
                          heartbeat_timeout=1.5, min_uptime=0.5)

    def hung():
        return next((pid for pid, slot, state in master.children()
                     if slot == "consumer hang#1" and state == "hung"), None)

    first = wait_for(hung, 10, "the hanging child")
    ok = master.by_slot()["consumer ok#1"]
    hung_at = time.monotonic()
    master.wait_log(f"consumer hang#1 (pid {first}) missed heartbeats for", timeout=10)
    noticed = time.monotonic() - hung_at
    wait_for(lambda: master.by_slot().get("consumer hang#1") not in (None, first), 5,
             lambda: f"a replacement for the hung child{master.tail()}")
    print(f"\nhung child killed {noticed:.2f}s after it was seen hanging (heartbeat timeout 1.5s)")
    assert gone(first)
    # SIGABRT first (faulthandler dumps its stacks), SIGKILL if that did not end it.
    assert re.search(rf"consumer hang#1 \(pid {first}\) exited with signal SIG(ABRT|KILL)", master.log())
    assert master.by_slot()["consumer ok#1"] == ok


# -- stopping ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_term_lets_the_task_in_hand_finish(start_master):
    master = start_master([group("consumer work", 1, "work", seconds=2)], graceful_timeout=10)
    pid = master.wait_up({"consumer work#1"}, state="working")["consumer work#1"]
    time.sleep(0.5)
    master.signal(signal.SIGTERM)
    started = time.monotonic()
    assert master.wait_exit(15) == exitcodes.EXIT_OK
    elapsed = time.monotonic() - started
    marker = master.state_dir / "finished" / str(pid)
    assert marker.exists(), master.tail()
    finished = json.loads(marker.read_text())
    assert finished["finished"] - finished["last_started"] >= 2 * 0.9  # the task ran its full length
    assert f"consumer work#1 (pid {pid}) exited with exit code 0" in master.log()
    print(f"\nTERM to exit with a 2s task in hand: {elapsed:.2f}s")


@pytest.mark.timeout(30)
def test_child_that_ignores_term_is_killed_after_graceful_timeout(start_master):
    master = start_master([group("consumer slow", 1, "slow_stop", seconds=30), group("consumer quick", 1)],
                          graceful_timeout=1)
    up = master.wait_up({"consumer slow#1", "consumer quick#1"})
    master.signal(signal.SIGTERM)
    started = time.monotonic()
    assert master.wait_exit(10) == exitcodes.EXIT_OK
    elapsed = time.monotonic() - started
    print(f"\nTERM to exit with a child ignoring TERM (graceful timeout 1s): {elapsed:.2f}s")
    assert elapsed >= 0.9
    log = master.log()
    slow, quick = up["consumer slow#1"], up["consumer quick#1"]
    assert f"consumer slow#1 (pid {slow}) still running 1.0s after TERM; killing" in log
    assert f"consumer slow#1 (pid {slow}) exited with signal SIGKILL" in log
    assert f"consumer quick#1 (pid {quick}) exited with exit code 0" in log
    assert gone(slow)


@pytest.mark.timeout(30)
def test_second_term_is_a_fast_stop(start_master):
    master = start_master([group("consumer slow", 2, "slow_stop", seconds=30)], graceful_timeout=30)
    up = master.wait_up({"consumer slow#1", "consumer slow#2"})
    master.signal(signal.SIGTERM)
    master.wait_up(set(up), state="stopping")  # both children are in their slow stop
    master.signal(signal.SIGTERM)
    started = time.monotonic()
    assert master.wait_exit(5) == exitcodes.EXIT_OK
    print(f"\nsecond TERM to exit: {time.monotonic() - started:.3f}s")
    log = master.log()
    assert "second stop request: fast stop" in log
    for slot, pid in up.items():
        assert f"{slot} (pid {pid}) exited with signal SIGKILL" in log
        assert gone(pid)


@pytest.mark.timeout(30)
def test_quit_is_a_fast_stop(start_master):
    master = start_master([group("consumer slow", 2, "slow_stop", seconds=30)], graceful_timeout=30)
    up = master.wait_up({"consumer slow#1", "consumer slow#2"})
    master.signal(signal.SIGQUIT)
    started = time.monotonic()
    assert master.wait_exit(5) == exitcodes.EXIT_OK
    print(f"\nQUIT to exit: {time.monotonic() - started:.3f}s")
    log = master.log()
    assert "received SIGQUIT" in log and "fast stop: killing 2 children" in log
    for slot, pid in up.items():
        assert f"{slot} (pid {pid}) exited with signal SIGKILL" in log


@pytest.mark.timeout(30)
def test_children_die_with_the_master(start_master):
    master = start_master([group("consumer a", 2), group("scheduler", numbered=False)])
    up = master.wait_up({"consumer a#1", "consumer a#2", "scheduler"})
    master.proc.kill()
    master.proc.wait(5)
    killed_at = time.monotonic()
    wait_for(lambda: all(gone(pid) for pid in up.values()), 5,
             lambda: f"children to die with the master: {[p for p in up.values() if not gone(p)]}")
    print(f"\nchildren gone {time.monotonic() - killed_at:.3f}s after the master was SIGKILLed")


# -- reload and scaling ------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_hup_applies_the_new_plan_one_child_per_slot(start_master):
    old_groups = [group("consumer a", 3, "slow_stop", seconds=0.8), group("consumer b", 2, "slow_stop", seconds=0.8),
                  group("scheduler", behaviour="slow_stop", seconds=0.8, numbered=False)]
    new_groups = [group("consumer a", 2), group("consumer b", 4), group("consumer c", 1)]
    master = start_master(old_groups, graceful_timeout=10)
    old = master.wait_up({"consumer a#1", "consumer a#2", "consumer a#3", "consumer b#1", "consumer b#2",
                          "scheduler"})
    expected = {"consumer a#1", "consumer a#2", "consumer b#1", "consumer b#2", "consumer b#3", "consumer b#4",
                "consumer c#1"}
    # During the reload a group may hold its old and its new size, whichever is larger, never more.
    group_limit = {"consumer a": 3, "consumer b": 4, "consumer c": 1, "scheduler": 1}
    violations = []
    samples = 0

    master.write_plan(new_groups)
    master.signal(signal.SIGHUP)
    started = time.monotonic()

    def settled():
        nonlocal samples
        samples += 1
        kids = master.children()
        per_slot = Counter(slot for _, slot, _ in kids if slot)
        per_group = Counter(slot.split("#")[0] for slot in per_slot.elements())
        violations.extend(f"slot {s} had {n} children" for s, n in per_slot.items() if n > 1)
        violations.extend(f"group {g} had {n} children" for g, n in per_group.items() if n > group_limit[g])
        current = {slot: pid for pid, slot, state in kids if slot and state == "idle"}
        return (set(current) == expected and len(kids) == len(expected)
                and not set(current.values()) & set(old.values()))

    wait_for(settled, 15, lambda: f"the new plan's children; have {master.children()}{master.tail()}",
             interval=0.01)
    elapsed = time.monotonic() - started
    assert not violations, violations[:10]
    master.wait_log("reload done in")
    assert all(gone(pid) for pid in old.values())
    print(f"\nHUP to every new child running: {elapsed:.2f}s (old children took 0.8s to stop; "
          f"{samples} samples, no slot ever had two children)")


@pytest.mark.timeout(30)
def test_hup_with_a_broken_plan_keeps_the_children(start_master):
    master = start_master([group("consumer a", 2)])
    before = master.wait_up({"consumer a#1", "consumer a#2"})
    master.write_raw_plan("{this is not json")
    master.signal(signal.SIGHUP)
    master.wait_log("reload failed: JSONDecodeError")
    assert "keeping the running children" in master.log()
    time.sleep(0.5)
    assert master.wait_up(set(before)) == before

    # A good plan afterwards is taken.
    master.write_plan([group("consumer a", 1)])
    master.signal(signal.SIGHUP)
    started = time.monotonic()
    wait_for(lambda: [(slot, state) for pid, slot, state in master.children() if pid != before["consumer a#1"]]
             == [("consumer a#1", "idle")], 10, lambda: f"the new plan{master.tail()}", interval=0.005)
    print(f"\nHUP to new child running (old one idle): {time.monotonic() - started:.3f}s")
    master.wait_up({"consumer a#1"})


@pytest.mark.timeout(40)
def test_ttin_ttou_resize_scalable_groups_never_below_one(start_master):
    master = start_master([group("consumer a", 2, scalable=True), group("consumer b", 1, scalable=True),
                           group("scheduler", numbered=False)])
    first = master.wait_up({"consumer a#1", "consumer a#2", "consumer b#1", "scheduler"})

    master.signal(signal.SIGTTIN)
    now = master.wait_up({"consumer a#1", "consumer a#2", "consumer a#3", "consumer b#1", "consumer b#2",
                          "scheduler"})
    assert {slot: now[slot] for slot in first} == first  # nobody else was touched

    master.signal(signal.SIGTTOU)
    now = master.wait_up({"consumer a#1", "consumer a#2", "consumer b#1", "scheduler"})
    assert now == first
    master.signal(signal.SIGTTOU)
    now = master.wait_up({"consumer a#1", "consumer b#1", "scheduler"})
    master.signal(signal.SIGTTOU)
    master.wait_log("no scalable group can change size by -1")
    assert master.wait_up({"consumer a#1", "consumer b#1", "scheduler"}) == now
    assert now == {slot: first[slot] for slot in now}
    assert "scaling: consumer a 2 -> 3, consumer b 1 -> 2" in master.log()
    assert "scaling: consumer a 3 -> 2, consumer b 2 -> 1" in master.log()

    # A reload takes the plan as written: the TTOU above is forgotten.
    master.signal(signal.SIGHUP)
    wait_for(lambda: (s := master.wait_up({"consumer a#1", "consumer a#2", "consumer b#1", "scheduler"}))
             and not set(s.values()) & set(first.values()), 10, lambda: f"reloaded children{master.tail()}")


@pytest.mark.timeout(30)
def test_usr1_reopens_logs_in_master_and_children(start_master):
    master = start_master([group("consumer a", 2)])
    up = master.wait_up({"consumer a#1", "consumer a#2"})
    master.signal(signal.SIGUSR1)
    for pid in (master.pid, *up.values()):
        wait_for(lambda: (master.state_dir / "reopened" / str(pid)).exists(), 5,
                 lambda: f"process {pid} to reopen its logs{master.tail()}")
    master.wait_log("received SIGUSR1")
    assert master.wait_up(set(up)) == up  # USR1 is no reason to restart anybody


# -- pidfile, configuration, systemd -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_pidfile_held_by_a_live_master_refuses_to_start(start_master, tmp_path):
    pidfile = tmp_path / "carrot.pid"
    first = start_master([group("consumer a", 1)], pidfile=pidfile)
    wait_for(lambda: pidfile.exists() and pidfile.read_text() == f"{first.pid}\n", 10,
             lambda: f"the pidfile to name the first master{first.tail()}")
    second = start_master([group("consumer a", 1)], pidfile=pidfile, proc_name=first.proc_name)
    assert second.wait_exit(10) == exitcodes.EXIT_PIDFILE
    assert pidfile.read_text() == f"{first.pid}\n"
    assert second.records() == []
    assert f"held by running process {first.pid}" in second.log()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("holder", ["unrelated", "child", "younger"])
def test_pidfile_naming_a_live_process_that_is_no_master_is_stale(start_master, tmp_path, holder):
    """A pid reused after a crash or a reboot: README promises a refusal only while a live master holds
    the file. An unrelated process, a child of a master, or a master that started after the file was
    written (so it did not write it) does not."""
    pidfile = tmp_path / "carrot.pid"
    other, proc_name = None, None
    if holder == "unrelated":
        pid = os.getpid()  # pytest: alive, and no master
    elif holder == "child":
        other = start_master([group("consumer a", 1)])
        pid = next(iter(other.wait_up({"consumer a#1"}).values()))
        proc_name = other.proc_name
    else:
        pidfile.write_text("1\n")
        os.utime(pidfile, (time.time() - 3600, time.time() - 3600))
        other = start_master([group("consumer a", 1)])
        other.wait_up({"consumer a#1"})
        pid = other.pid
        proc_name = other.proc_name
    pidfile.write_text(f"{pid}\n")
    if holder == "younger":
        os.utime(pidfile, (time.time() - 3600, time.time() - 3600))
    master = start_master([group("consumer a", 1)], pidfile=pidfile, proc_name=proc_name)
    wait_for(lambda: pidfile.read_text() == f"{master.pid}\n", 10,
             lambda: f"the pidfile to name the new master{master.tail()}")
    master.wait_up({"consumer a#1"})
    assert re.search(rf"replacing stale pidfile .*process {pid} ", master.log()), master.tail()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content", ["dead pid", "garbage"])
def test_stale_pidfile_is_replaced_and_removed_on_exit(start_master, tmp_path, content):
    pidfile = tmp_path / "carrot.pid"
    pidfile.write_text(f"{dead_pid()}\n" if content == "dead pid" else "not a pid at all\n")
    master = start_master([group("consumer a", 1)], pidfile=pidfile)
    wait_for(lambda: pidfile.exists() and pidfile.read_text() == f"{master.pid}\n", 10,
             lambda: f"the pidfile to name the master{master.tail()}")
    master.wait_up({"consumer a#1"})
    assert "replacing stale pidfile" in master.log()
    master.signal(signal.SIGTERM)
    assert master.wait_exit(10) == exitcodes.EXIT_OK
    assert not pidfile.exists()


@pytest.mark.timeout(30)
def test_broken_plan_at_start_exits_with_config_code(start_master):
    master = start_master([])
    master.write_raw_plan("[")
    assert master.wait_exit(10) == exitcodes.EXIT_CONFIG
    assert re.search(r"JSONDecodeError: .*; not starting", master.log()), master.tail()
    assert master.records() == []


@pytest.mark.timeout(40)
def test_sd_notify_messages(start_master):
    directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # AF_UNIX paths must stay short
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    messages: list[list[str]] = []

    def received(line_start, count=1):
        while True:
            try:
                messages.append(sock.recv(4096).decode().split("\n"))
            except BlockingIOError:
                break
        return sum(1 for msg in messages for line in msg if line.startswith(line_start)) >= count

    try:
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "NOTIFY_SOCKET")}
        env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
        master = start_master([group("consumer a", 2)], env=env)
        started = time.monotonic()
        wait_for(lambda: received("READY=1"), 10, lambda: f"READY=1; got {messages}{master.tail()}")
        print(f"\nstart to READY=1: {time.monotonic() - started:.2f}s")
        # READY means every slot's child has sent a heartbeat, not merely been forked.
        log = master.log()
        assert log.index("ready: 2 children up") > max(log.index("consumer a#1 (pid"), log.index("consumer a#2 (pid"))
        assert log.count(" is up") >= 2 and log.index("ready: 2") > log.rindex(" is up")
        statuses = [line for msg in messages for line in msg if line.startswith("STATUS=")]
        assert "STATUS=2 children up (consumer a: 2); 0 restarts" in statuses
        wait_for(lambda: received("WATCHDOG=1", 3), 5, lambda: f"three WATCHDOG=1; got {messages}")

        master.signal(signal.SIGHUP)
        wait_for(lambda: received("RELOADING=1"), 10, lambda: f"RELOADING=1; got {messages}")
        reloading = next(msg for msg in messages if "RELOADING=1" in msg)
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        wait_for(lambda: received("READY=1", 2), 10, lambda: f"a second READY=1; got {messages}")

        master.signal(signal.SIGTERM)
        assert master.wait_exit(10) == exitcodes.EXIT_OK
        assert received("STOPPING=1")
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


# -- the pieces, in process --------------------------------------------------------------------------


def body(ctx):
    return 0


def test_plan_slots_and_validation():
    plan = Plan((SlotGroup("consumer default", 2, body, scalable=True),
                 SlotGroup("consumer empty", 0, body),
                 SlotGroup("scheduler", 1, body, numbered=False)))
    assert [(s.name, s.group.name, s.index) for s in plan.slots()] == [
        ("consumer default#1", "consumer default", 1),
        ("consumer default#2", "consumer default", 2),
        ("scheduler", "scheduler", 1),
    ]
    assert [g.size for g in plan.scaled(+1).groups] == [3, 0, 1]
    assert [g.size for g in plan.scaled(-1).scaled(-1).groups] == [1, 0, 1]
    with pytest.raises(PlanError, match="size"):
        SlotGroup("a", -1, body)
    with pytest.raises(PlanError, match="exactly one slot"):
        SlotGroup("scheduler", 2, body, numbered=False)
    with pytest.raises(PlanError, match="duplicate group names: a"):
        Plan((SlotGroup("a", 1, body), SlotGroup("a", 2, body)))
    with pytest.raises(PlanError, match="callable"):
        SlotGroup("a", 1, "not callable")
    with pytest.raises(PlanError, match="'#'"):
        SlotGroup("a#1", 1, body, numbered=False)


def test_the_master_holds_the_plans_shape_without_targets():
    plan = Plan((SlotGroup("consumer default", 2, body, scalable=True),
                 SlotGroup("scheduler", 1, body, numbered=False)))
    shape = plan.shape()
    assert shape == [{"name": "consumer default", "size": 2, "scalable": True, "numbered": True, "auxiliary": False},
                     {"name": "scheduler", "size": 1, "scalable": False, "numbered": False, "auxiliary": False}]
    copy = Plan.from_shape(json.loads(json.dumps(shape)))  # as it crosses the image's channel
    assert [type(g) for g in copy.groups] == [GroupShape, GroupShape]
    assert not any(hasattr(g, "target") for g in copy.groups)
    assert copy.slots() == [(s.name, GroupShape(s.group.name, s.group.size, scalable=s.group.scalable,
                                                numbered=s.group.numbered), s.index) for s in plan.slots()]
    assert copy.describe() == plan.describe() and copy.shape() == shape
    assert [g.size for g in copy.scaled(+1).groups] == [3, 1]
    with pytest.raises(PlanError, match="exactly one slot"):
        Plan.from_shape([{"name": "scheduler", "size": 2, "scalable": False, "numbered": False}])
    with pytest.raises(KeyError):
        Plan.from_shape([{"name": "a"}])


def test_exit_codes_are_distinct_and_avoid_1_and_2():
    codes = [exitcodes.EXIT_OK, exitcodes.EXIT_CONFIG, exitcodes.EXIT_BROKER, exitcodes.EXIT_PIDFILE,
             exitcodes.EXIT_CRASHING]
    assert len(set(codes)) == len(codes)
    assert not {1, 2} & set(codes)


def test_notifier_abstract_namespace_and_no_op():
    name = f"carrot-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
        assert notifier.watchdog_interval is None  # the watchdog belongs to pid 1, not to us
        notifier.ready("all good")
        assert sock.recv(4096) == b"READY=1\nSTATUS=all good"
        notifier.close()
    finally:
        sock.close()
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.ready()  # no socket, no error
    broken = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    broken.ready()  # a failed send is not an error either
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5


def test_pidfile_release_leaves_another_masters_file(tmp_path):
    path = tmp_path / "p.pid"
    pidfile = Pidfile(str(path))
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "p.pid"]  # no temporary file left
    path.write_text("1\n")  # another (live) master took over
    pidfile.release()
    assert path.read_text() == "1\n"
    with pytest.raises(PidfileHeld):
        Pidfile(str(path), holder_check=lambda pid, name, written: None).acquire()  # pid 1 as a master
    Pidfile(str(path)).acquire()  # pid 1 is no carrot-supervisor master: the file is stale
    assert path.read_text() == f"{os.getpid()}\n"


def test_a_pidfile_holder_is_judged_by_title_command_line_and_start_time(tmp_path):
    from supervisor.pidfile import master_holding
    me = psutil.Process()
    assert "is not a carrot-supervisor master" in master_holding(os.getpid(), "carrot-supervisor", None)
    assert master_holding(os.getpid(), "carrot-supervisor", me.create_time() - 3600).startswith(
        f"process {os.getpid()} started after the pidfile was written")
    assert "is not running" in master_holding(dead_pid(), "carrot-supervisor", None)
    name = os.path.basename(me.cmdline()[0])  # this process, as if it were the program: a master
    assert master_holding(os.getpid(), name, None) is None


def test_heartbeats_are_rate_limited():
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        ctx = ChildContext(slot="a#1", group="a", index=1, master_pid=os.getpid(), proc_name="t",
                           heartbeat_fd=write_fd, beat_interval=10)
        for _ in range(100):
            ctx.heartbeat()
        assert os.read(read_fd, 100) == b"\n"
        assert ctx.master_alive() is False  # our parent is not us
    finally:
        os.close(read_fd)
        os.close(write_fd)
