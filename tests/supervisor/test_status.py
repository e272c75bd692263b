"""The status document and line from an Arbiter's view (Arbiter.view() -> snapshot(), status_line()).

The master's parts are filled through their own calls (spawn requests over a real image channel, reports
over real heartbeat pipes), then the document is compared field by field with the one the master wrote
before the view existed: the same state gave exactly this document (`updated` and `host` aside).
"""
import dataclasses
import logging
import os
import socket

import pytest

from supervisor.arbiter import Arbiter
from supervisor.images import Image
from supervisor.plan import GroupShape, Plan, Slot
from supervisor.protocol import BEAT, MAX_PACKET, Report, Spawn, decode
from supervisor.restarts import RestartPolicy
from supervisor.status import StatusView, snapshot, status_line

NOW = 1000.0
SHAPE = [dict(name='consumer default', size=3, scalable=True, numbered=True),
         dict(name='consumer other', size=1, scalable=True, numbered=True),
         dict(name='scheduler', size=1, scalable=False, numbered=False)]

EXPECTED = {
    'version': 1, 'pid': 4242, 'started': '2027-01-15T08:00:00+00:00', 'state': 'running', 'generation': 2,
    'image': {'pid': 4260, 'generation': 3, 'state': 'starting', 'error': None}, 'restarts': 7,
    'slots': [
        {'name': 'consumer default#1', 'group': 'consumer default', 'pid': 4301, 'generation': 2,
         'state': 'running', 'task': 'myapp.tasks.resize', 'task_id': 'abc', 'task_age': 3.2, 'restarts': 2,
         'next_start': None, 'problem': None, 'memory_rss': None, 'memory_uss': None, 'memory_pss': None},
        {'name': 'consumer default#2', 'group': 'consumer default', 'pid': 4302, 'generation': 2,
         'state': 'idle', 'task': None, 'task_id': None, 'task_age': None, 'restarts': 0, 'next_start': None,
         'problem': None, 'memory_rss': None, 'memory_uss': None, 'memory_pss': None},
        {'name': 'consumer default#3', 'group': 'consumer default', 'pid': None, 'generation': None,
         'state': 'backoff', 'task': None, 'task_id': None, 'task_age': None, 'restarts': 2, 'next_start': 0.8,
         'problem': 'died young 2 times in a row (last: exit code 1 after 0.1s)', 'memory_rss': None,
         'memory_uss': None, 'memory_pss': None},
        {'name': 'consumer other#1', 'group': 'consumer other', 'pid': None, 'generation': 2,
         'state': 'starting', 'task': None, 'task_id': None, 'task_age': None, 'restarts': 1, 'next_start': None,
         'problem': 'died young 1 times in a row (last: signal SIGKILL after 0.1s)', 'memory_rss': None,
         'memory_uss': None, 'memory_pss': None},
        {'name': 'scheduler', 'group': 'scheduler', 'pid': 4303, 'generation': 2, 'state': 'starting',
         'task': None, 'task_id': None, 'task_age': None, 'restarts': 0, 'next_start': None, 'problem': None,
         'memory_rss': None, 'memory_uss': None, 'memory_pss': None},
    ],
    'settings': 'proj.settings',
}
LINE = ('3 children up (consumer default: 2, consumer other: 0, scheduler: 0, consumer gone: 1); 7 restarts; '
        'parked: consumer other#1')


class Master:
    """An Arbiter that never runs, its images played by the test through the other ends of their channels."""

    def __init__(self):
        self.arbiter = Arbiter(lambda generation: None, status_extra={'settings': 'proj.settings'},
                               logger=logging.getLogger('test'))
        self.peers, self.beat_fds = {}, []

    def image(self, pid, generation):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.peers[pid] = theirs
        image = Image(pid=pid, generation=generation, sock=ours, started_at=NOW - 100)
        self.arbiter.images.add(image)
        return image

    def child(self, image, slot, pid):
        """A child of `image` in `slot`, its pid told (None: the image has not answered yet)."""
        table = self.arbiter.table
        child = table.request(image, slot, 1.0)
        data, fds, _flags, _addr = socket.recv_fds(self.peers[image.pid], MAX_PACKET, 4)
        assert decode(data) == Spawn(child.request, slot.name, slot.group.name, slot.index, 1.0)
        self.beat_fds.append(fds[0])
        if pid is not None:
            table.adopt(table.take_pending(image, child.request), pid)
        return child, fds[0]

    def say(self, child, beat_fd, data, at):
        os.write(beat_fd, data)
        self.arbiter.table.read(child.heartbeat_fd, at)

    def close(self):
        for fd in self.beat_fds:
            os.close(fd)
        for peer in self.peers.values():
            peer.close()
        self.arbiter.table.close_all()
        self.arbiter.images.close_all()


@pytest.fixture
def master():
    master = Master()
    arbiter = master.arbiter
    arbiter.pid, arbiter.started, arbiter.restarts = 4242, 1_800_000_000.0, 7
    arbiter.readiness.ready_sent = True  # it has been running, every slot up once
    plan = Plan.from_shape(SHAPE)
    arbiter.set_plan(plan, fresh=True)
    book = arbiter.book
    for _ in range(2):
        book.record_exit('consumer default#1', uptime=100, code=0, how='exit code 0', was_working=True, now=NOW - 50)
        book.record_exit('consumer default#3', uptime=0.1, code=1, how='exit code 1', was_working=False,
                         now=NOW - 0.2)
    book.policy = RestartPolicy(park_after=1)
    book.record_exit('consumer other#1', uptime=0.1, code=-9, how='signal SIGKILL', was_working=False, now=NOW)

    old = master.image(4150, 1)
    arbiter.images.promote(old, plan)
    serving = master.image(4250, 2)
    arbiter.images.promote(serving, plan)
    master.image(4260, 3)  # a reload's image, still building
    slots = {slot.name: slot for slot in plan.slots()}

    running, fd = master.child(serving, slots['consumer default#1'], 4301)
    master.say(running, fd, Report('running', 'myapp.tasks.resize', 'abc', 1.25).encode(), NOW - 2.0)
    retiring, fd = master.child(old, slots['consumer default#1'], 4200)  # the child it replaces
    master.say(retiring, fd, Report('idle').encode(), NOW - 5.0)
    retiring.retiring = True
    idle, fd = master.child(serving, slots['consumer default#2'], 4302)
    master.say(idle, fd, Report('idle').encode(), NOW - 1.0)
    master.child(serving, slots['scheduler'], 4303)  # forked, not beating yet
    gone, fd = master.child(old, Slot('consumer gone#1', GroupShape('consumer gone', 1), 1), 4100)
    master.say(gone, fd, BEAT, NOW)  # a group of the old plan, still up
    master.child(serving, slots['consumer other#1'], None)  # asked for, no pid yet
    yield master
    master.close()


def test_the_view_gives_the_same_document_as_the_arbiter_did(master):
    document = snapshot(master.arbiter.view(), NOW)
    assert document.pop('host') == socket.gethostname()
    assert document.pop('updated')
    assert document == EXPECTED
    assert list(document) == list(EXPECTED)  # the same order of fields, too
    assert [list(slot) for slot in document['slots']] == [list(slot) for slot in EXPECTED['slots']]


@pytest.mark.parametrize('change, state, line', [
    ({}, 'running', LINE),
    ({'stopping': 'graceful'}, 'stopping', 'stopping: 5 children left'),
    ({'reloading': True}, 'reloading', 'reloading; ' + LINE),
    ({'ready_sent': False}, 'starting', LINE),
])
def test_the_state_and_the_status_line(master, change, state, line):
    arbiter = master.arbiter
    if 'stopping' in change:
        arbiter.stopping = change['stopping']
    arbiter.readiness.reloading = change.get('reloading', False)
    arbiter.readiness.ready_sent = change.get('ready_sent', True)
    view = arbiter.view()
    assert snapshot(view, NOW)['state'] == state
    assert status_line(view) == line


def test_the_view_is_a_copy_that_later_changes_do_not_reach(master):
    view = master.arbiter.view()
    assert isinstance(view, StatusView)
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.restarts = 8
    master.arbiter.restarts = 8
    master.arbiter.book.hold('consumer default#3', NOW + 10)
    master.arbiter.status_extra['settings'] = 'other.settings'
    document = snapshot(view, NOW)
    assert document['restarts'] == 7 and document['slots'][2]['next_start'] == 0.8
    assert document['settings'] == 'proj.settings'
    assert snapshot(master.arbiter.view(), NOW)['slots'][2]['next_start'] == 10.0
