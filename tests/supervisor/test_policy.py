"""Unit tests of the master's passive parts: restart policy, signal queue, readiness, status document."""
import json
import logging
import os
import signal
import select

import pytest

from supervisor.procs import escape_control, set_title
from supervisor.readiness import Readiness
from supervisor.restarts import RestartPolicy, SlotRecord, all_parked, backoff, judge_exit
from supervisor.sdnotify import Notifier
from supervisor.signals import SignalQueue
from supervisor.status import StatusFile

POLICY = RestartPolicy(min_uptime=5, backoff_base=0.5, backoff_cap=4, park_after=4, park_cap=60)


def judge(failures=0, uptime=0.1, code=1, was_working=False, retiring=False):
    return judge_exit(POLICY, failures, uptime=uptime, code=code, was_working=was_working, retiring=retiring)


def test_a_young_failure_backs_off_exponentially_up_to_the_cap():
    assert [backoff(POLICY, n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    verdict = judge(failures=2)
    assert verdict.failure and verdict.failures == 3 and verdict.delay == 2.0 and not verdict.parked


def test_the_park_after_th_failure_parks_the_slot_with_a_longer_cap():
    verdict = judge(failures=3)
    assert verdict.parked and verdict.failures == 4 and verdict.delay == 4.0
    assert [backoff(POLICY, n) for n in (5, 6, 7, 8, 30)] == [8.0, 16.0, 32.0, 60.0, 60.0]


@pytest.mark.parametrize('kwargs', [dict(retiring=True), dict(uptime=5.0), dict(was_working=True)])
def test_asked_to_go_lived_long_or_was_working_is_no_failure(kwargs):
    verdict = judge(failures=3, **kwargs)
    assert not verdict.failure and verdict.delay == 0 and not verdict.parked


def test_a_child_that_died_mid_task_after_consuming_resets_the_count():
    assert judge(failures=3, was_working=True, code=-9).failures == 0


def test_a_clean_young_exit_is_refilled_at_once_and_keeps_the_count():
    verdict = judge(failures=2, code=0)
    assert not verdict.failure and verdict.failures == 2 and verdict.delay == 0


def test_the_master_gives_up_only_when_every_slot_is_parked():
    records = {'a': SlotRecord(parked=True), 'b': SlotRecord()}
    assert not all_parked(records)
    records['b'].parked = True
    assert all_parked(records)
    assert not all_parked({})


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        RestartPolicy(park_after=0)
    with pytest.raises(ValueError):
        RestartPolicy(backoff_cap=0)


def test_signal_queue_queues_in_order_and_wakes_the_poller():
    queue = SignalQueue((signal.SIGUSR2, signal.SIGCHLD))
    poller = select.poll()
    queue.install(poller)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGCHLD)  # wakes, is not queued
        os.kill(os.getpid(), signal.SIGUSR2)
        assert [fd for fd, _ in poller.poll(1000)] == [queue.wake_r]
        assert [queue.pop(), queue.pop(), queue.pop()] == [signal.SIGUSR2, signal.SIGUSR2, None]
        queue.drain()
        assert poller.poll(0) == []
    finally:
        queue.restore()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


class Recorder(Notifier):
    def __init__(self):
        super().__init__({'WATCHDOG_USEC': '2000000'})
        self.sent = []

    def notify(self, *assignments):
        self.sent.append(assignments)


def test_readiness_sends_ready_once_all_are_up_and_again_after_a_reload():
    import logging
    notifier = Recorder()
    readiness = Readiness(notifier, logging.getLogger('test'))
    readiness.starting(0.0)
    assert readiness.awaiting
    readiness.all_up(1.0, 2, 'up')
    readiness.all_up(2.0, 2, 'up')
    assert [s[0] for s in notifier.sent] == ['READY=1']
    readiness.reload_started(3.0)
    assert readiness.awaiting and readiness.reloading
    readiness.reload_failed('kept')  # the old set stays: READY=1 again, no longer reloading
    assert not readiness.awaiting
    assert notifier.sent[-1][0] == 'READY=1'
    readiness.watchdog(10.0)
    readiness.watchdog(10.5)  # within the interval (1 s, half of WATCHDOG_USEC): nothing
    assert [s for s in notifier.sent if s == ('WATCHDOG=1',)] == [('WATCHDOG=1',)]


def test_a_reload_that_fails_before_the_first_ready_sends_no_ready():
    import logging
    notifier = Recorder()
    readiness = Readiness(notifier, logging.getLogger('test'))
    readiness.starting(0.0)
    readiness.reload_started(0.5)
    readiness.reload_failed('x')
    assert readiness.awaiting  # READY=1 is still owed for the start
    assert not [s for s in notifier.sent if s[0] == 'READY=1']


def test_a_hup_while_starting_is_no_reload_the_start_ends_in_ready(caplog):
    import logging
    notifier = Recorder()
    readiness = Readiness(notifier, logging.getLogger('test'))
    readiness.starting(0.0)
    readiness.reload_started(0.1)  # HUP before the first READY=1 (found by the attack tests)
    with caplog.at_level(logging.INFO, logger='test'):
        readiness.all_up(1.0, 2, 'up')
    assert [s[0] for s in notifier.sent if s[0].startswith(('READY', 'RELOADING'))] == ['READY=1']
    assert 'ready: 2 children up in 1.00s' in caplog.text


def test_status_file_is_replaced_atomically_and_only_when_it_changes(tmp_path):
    path = tmp_path / 'status.json'
    status = StatusFile(str(path))
    slot = {'name': 's', 'pid': None, 'state': 'idle', 'task': None, 'task_id': None}
    document = {'updated': 'a', 'slots': [{**slot, 'task_age': 1.0}]}
    status.update(document)
    first = path.stat().st_ino
    assert json.loads(path.read_text())['updated'] == 'a'
    status.update({**document, 'updated': 'b', 'slots': [{**slot, 'task_age': 2.0}]})
    assert json.loads(path.read_text())['updated'] == 'a'  # only the clock moved: not rewritten yet
    status.update({**document, 'state': 'reloading'})  # a change of shape: written at once
    assert json.loads(path.read_text())['state'] == 'reloading'
    assert path.stat().st_ino != first  # a new file renamed over the old one
    assert [p.name for p in tmp_path.iterdir()] == ['status.json']
    status.remove()
    assert not path.exists()


def test_titles_escape_control_characters_and_never_raise():
    assert escape_control('task\x00\n\x1b[31mred') == 'task\\x00\\n\\x1b[31mred'
    assert escape_control('plain é') == 'plain é'
    set_title('a\x00b')  # NUL would make setproctitle raise ValueError
    set_title(object())


def _child(**kwargs):
    from supervisor.children import Child
    return Child(slot='consumer a#1', group='consumer a', generation=1, heartbeat_fd=-1, started_at=0.0,
                 last_beat=kwargs.pop('last_beat', 0.0), pid=10, **kwargs)


def test_a_silent_child_is_aborted_then_killed_and_a_retired_one_killed_at_its_deadline():
    assert _child(last_beat=100.0).overdue(now=159.0, heartbeat_timeout=60, abort_grace=2) is None
    assert _child(last_beat=100.0).overdue(now=161.0, heartbeat_timeout=60, abort_grace=2) == 'silent'
    aborted = _child(last_beat=100.0, aborted_at=161.0)
    assert aborted.overdue(now=162.0, heartbeat_timeout=60, abort_grace=2) is None  # SIGABRT's grace
    assert aborted.overdue(now=163.0, heartbeat_timeout=60, abort_grace=2) == 'hung'
    assert aborted.next_deadline(now=162.0, heartbeat_timeout=60, abort_grace=2) == 163.0
    retired = _child(last_beat=100.0, retiring=True, retire_deadline=130.0)
    assert retired.overdue(now=129.0, heartbeat_timeout=60, abort_grace=2) is None
    assert retired.overdue(now=130.0, heartbeat_timeout=60, abort_grace=2) == 'retired'
    assert retired.next_deadline(now=120.0, heartbeat_timeout=60, abort_grace=2) == 130.0
    assert _child(last_beat=0.0, killed='fast stop').overdue(now=1e6, heartbeat_timeout=60, abort_grace=2) is None


def test_exits_reaped_before_the_pid_was_known_are_kept_for_a_while():
    from supervisor.children import ChildTable
    table = ChildTable(select.poll(), logging.getLogger('test'))
    table.note_unknown_exit(41, -9, now=0.0)
    table.note_unknown_exit(42, 1, now=31.0)  # 41 is forgotten: nobody asked for it in 30 s
    assert table.unknown_exits == {42: (1, 31.0)}
    assert table.take_unknown_exit(41) is None
    assert table.take_unknown_exit(42) == 1 and table.take_unknown_exit(42) is None


def test_a_held_slot_stays_empty_until_then_and_a_slot_gone_from_the_plan_holds_nothing():
    from supervisor.restarts import SlotBook
    book = SlotBook(RestartPolicy())
    book.reset(['a#1'], fresh=True)
    assert 'a#1' in book and 'b#1' not in book and book.next_start('a#1') == 0.0
    book.hold('a#1', 12.0)
    assert book.next_start('a#1') == 12.0
    book.hold('b#1', 12.0)  # its child's spawn failed after a TTOU took the slot away
    assert 'b#1' not in book
    book.reset(['a#1'], fresh=False)
    assert book.next_start('a#1') == 12.0  # scaling keeps what a slot waits for; a new image does not
    book.reset(['a#1'], fresh=True)
    assert book.next_start('a#1') == 0.0


def test_a_slot_whose_child_works_or_lived_long_is_cleared_and_a_parked_one_says_so():
    from types import SimpleNamespace

    from supervisor.restarts import SlotBook
    book = SlotBook(RestartPolicy(min_uptime=5.0, park_after=1))
    book.reset(['a#1', 'b#1', 'c#1'], fresh=True)
    for slot in ('a#1', 'b#1', 'c#1'):
        book.record_exit(slot, uptime=0.1, code=1, how='exit code 1', was_working=False, now=0.0)
    kids = [SimpleNamespace(slot='a#1', working=True, started_at=99.0),    # reached its queue
            SimpleNamespace(slot='b#1', working=False, started_at=90.0),   # lived min_uptime
            SimpleNamespace(slot='c#1', working=False, started_at=99.0)]   # neither, yet
    assert book.note_working(kids, now=100.0) == ['slot a#1 is up again; no longer parked',
                                                  'slot b#1 is up again; no longer parked']
    assert book.parked() == ['c#1']


def test_auxiliary_slots_never_keep_a_crashing_master_alive_nor_bring_it_down():
    parked, up = SlotRecord(parked=True), SlotRecord()
    # Every consumer parked: give up, whatever the helper (housekeeping) does.
    assert all_parked({"consumer#1": parked, "helper": up}, frozenset({"helper"}))
    # A parked helper alone is no reason to give up while a consumer runs ...
    assert not all_parked({"consumer#1": up, "helper": parked}, frozenset({"helper"}))
    # ... nor is a plan of helpers only.
    assert not all_parked({"helper": parked}, frozenset({"helper"}))
