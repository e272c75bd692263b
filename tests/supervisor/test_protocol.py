"""The master <-> image messages and the heartbeat-pipe reports (supervisor/protocol.py): what is sent
reads back the same, and nothing a reader is handed makes it raise."""
import json
import os
import socket

import pytest

from supervisor.protocol import (
    BEAT, MAX_PACKET, MAX_REPORT, Eof, Failed, Ready, Report, Spawn, Spawned, SpawnFailed, decode, read_reports,
)

MESSAGES = [
    Spawn(request=7, slot='consumer default#2', group='consumer default', index=2, beat_interval=1.0),
    Ready(groups=({'name': 'consumer default', 'size': 2, 'scalable': True, 'numbered': True},
                  {'name': 'scheduler', 'size': 1, 'scalable': False, 'numbered': False}),
          options={'graceful_timeout': 12.5, 'heartbeat_timeout': None}),
    Ready(groups=(), options={}),
    Failed(error='ImproperlyConfigured: CARROT is broken', exit_code=4),
    Spawned(request=7, pid=4301),
    SpawnFailed(request=8, error='cannot fork: [Errno 11] Resource temporarily unavailable'),
]


@pytest.mark.parametrize('message', MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_reads_back_as_it_was_sent(message):
    assert decode(message.encode()) == message


def test_the_wire_format_is_one_json_object_named_by_its_key():
    # What the image and master of one generation exchange; also what a reader of a packet capture sees.
    assert json.loads(MESSAGES[0].encode()) == {'spawn': 7, 'slot': 'consumer default#2', 'group': 'consumer default',
                                                'index': 2, 'beat_interval': 1.0}
    assert json.loads(Spawned(7, 4301).encode()) == {'spawned': 7, 'pid': 4301}
    assert json.loads(SpawnFailed(8, 'no').encode()) == {'spawn_failed': 8, 'error': 'no'}
    assert json.loads(Failed('bad', 3).encode()) == {'failed': 'bad', 'exit_code': 3}
    assert json.loads(Ready(({'name': 'a'},), {'x': 1}).encode()) == {'ready': [{'name': 'a'}], 'options': {'x': 1}}


def test_an_empty_read_is_the_end_of_the_channel():
    assert decode(b'') == Eof()


def test_lenient_where_the_old_readers_were():
    # A failure without an exit code (or with 0) is a configuration failure; a ready without options has none.
    assert decode(b'{"failed": "x"}') == Failed('x', 3)
    assert decode(b'{"failed": "x", "exit_code": 0}') == Failed('x', 3)
    assert decode(b'{"ready": [], "options": null}') == Ready((), {})
    assert decode(b'{"spawn_failed": 3}') == SpawnFailed(3, 'None')


JUNK = [
    b'\x00\xff', b'not json', b'[]', b'"spawn"', b'42', b'null', b'{}', b'{"unknown": 1}',
    b'{"spawn": 1}', b'{"spawn": "1", "slot": "a", "group": "a", "index": 1, "beat_interval": 1}',
    b'{"spawn": true, "slot": "a", "group": "a", "index": 1, "beat_interval": 1}',
    b'{"spawn": 1, "slot": "a", "group": "a", "index": 1, "beat_interval": "soon"}',
    b'{"spawned": 1}', b'{"spawned": 1, "pid": "4301"}', b'{"spawned": 1.5, "pid": 4301}',
    b'{"spawn_failed": null}', b'{"failed": "x", "exit_code": "three"}', b'{"failed": "x", "exit_code": 1e999}',
    b'{"ready": {"name": "a"}}', b'{"ready": [], "options": [1]}', b'{"ready": "everything"}',
    b'{"pid": 1}', json.dumps({'spawned': 1, 'pid': 2}).encode()[:-1], b'{' * 100_000, b'[' * MAX_PACKET,
]


@pytest.mark.parametrize('data', JUNK)
def test_junk_reads_as_nothing(data):
    assert decode(data) is None


def test_a_spawn_travels_with_its_heartbeat_pipe():
    master, image = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    beat_r, beat_w = os.pipe()
    try:
        socket.send_fds(master, [MESSAGES[0].encode()], [beat_w])
        data, fds, _flags, _addr = socket.recv_fds(image, MAX_PACKET, 4)
        assert decode(data) == MESSAGES[0] and len(fds) == 1
        os.write(fds[0], BEAT)
        os.close(fds[0])
        assert os.read(beat_r, 10) == b'\n'
        master.close()
        assert decode(image.recv(MAX_PACKET)) == Eof()
    finally:
        for fd in (beat_r, beat_w):
            os.close(fd)
        master.close()
        image.close()


def test_a_report_is_one_line_and_reads_back():
    report = Report('running', 'myapp.tasks.resize', '6b1c0e0a-0000-4000-8000-000000000000', 3.25)
    line = report.encode()
    assert line.endswith(b'\n') and line.count(b'\n') == 1
    assert json.loads(line) == {'state': 'running', 'task': 'myapp.tasks.resize',
                                'task_id': '6b1c0e0a-0000-4000-8000-000000000000', 'age': 3.25}
    assert Report.decode(line[:-1]) == report
    assert Report.decode(Report('idle').encode()[:-1]) == Report('idle')


def test_an_oversize_report_is_cut_to_one_pipe_write_and_then_ignored():
    line = Report('running', 'x' * 10_000).encode()
    assert len(line) == MAX_REPORT + 1
    reports, rest = read_reports(b'', line)
    assert reports == [] and rest == b''


def test_reports_are_read_across_reads_and_beats_and_junk_count_for_nothing():
    first, second = Report('idle').encode(), Report('running', 't', 'id', 0.5).encode()
    stream = BEAT + first + BEAT + b'{"state": \n' + b'[1, 2]\n' + second + b'{"state": "id'
    reports, rest = read_reports(b'', stream[:5])
    assert reports == []
    reports, rest = read_reports(rest, stream[5:])
    assert reports == [Report('idle'), Report('running', 't', 'id', 0.5)]
    assert rest == b'{"state": "id'
    reports, rest = read_reports(rest, b'le"}\n')
    assert reports == [Report('idle')] and rest == b''


def test_a_report_with_odd_fields_still_reads_and_never_raises():
    # Any JSON object is a report (the child is at its work); fields of the wrong type are dropped.
    assert Report.decode(b'{}') == Report(None)
    assert Report.decode(b'{"state": "running", "age": "long"}') == Report('running', age=None)
    assert Report.decode(b'{"state": "running", "age": true}') == Report('running', age=None)
    assert Report.decode(b'{"state": 5, "task": ["a"]}') == Report('5', "['a']")
    for junk in (b'', b'\xff', b'"idle"', b'[]', b'nul', b'[' * MAX_REPORT):
        assert Report.decode(junk) is None
    reports, rest = read_reports(b'x' * 10_000, b'y' * 10_000)  # a line that never ends: only its tail is kept
    assert reports == [] and len(rest) == 4096
