"""What an operator's machine can do to carrot-supervisor (issue 14): a pidfile naming a live process that
is no carrot master (a pid reused after a crash or a reboot), links planted at every predictable name in a
pidfile or status directory others can write, and a full disk under the log file."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# -- a pidfile naming a live process that is no master ------------------------------------------------

@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_a_pidfile_naming_a_live_process_that_is_no_master_does_not_stop_a_start(start_supervisor, tmp_path):
    pidfile = tmp_path / 'carrot.pid'
    squatter = subprocess.Popen(['sleep', '60'])  # what the pid now names: alive, and no carrot master
    try:
        pidfile.write_text(f'{squatter.pid}\n')
        sup = start_supervisor('--pidfile', str(pidfile), '--queues', 'default')
        sup.wait_ready(['consumer default#1'])
        assert pidfile.read_text() == f'{sup.pid}\n'
        sup.wait_log(rf"replacing stale pidfile .* \(process {squatter.pid} is not a carrot-supervisor master "
                     rf"\(it is 'sleep 60'\)\)")
        assert squatter.poll() is None  # never signalled
    finally:
        squatter.kill()
        squatter.wait()


# -- links planted in a directory others can write ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_links_planted_at_every_predictable_name_are_never_written_through(start_supervisor, tmp_path):
    """A directory anyone can write (mode 1777, as /tmp): a local user plants links at the pidfile, the
    status file and every temporary name one could predict, pointing at a file of the master's user. The
    master writes its pidfile and status snapshot many times, and stops; the file pointed at is intact,
    and the master said at start that the directory is writable by others."""
    shared = tmp_path / 'shared'
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious\n')
    pidfile, status = shared / 'carrot.pid', shared / 'carrot.status.json'
    predictable = [pidfile, status]
    for base in ('carrot.pid', 'carrot.status.json'):
        predictable += [shared / f'{base}.tmp', shared / f'.{base}.tmp', shared / f'{base}~', shared / f'.{base}',
                        shared / f'{base}.new', shared / f'.{base}.swp']
        predictable += [shared / f'.{base}.{n}.tmp' for n in range(50)]  # guesses at mkstemp's names
    for name in predictable:
        os.symlink(victim, name)
    sup = start_supervisor('--pidfile', str(pidfile), '--queues', 'default', logfile=True, status_file=False,
                           name='shared')
    sup.wait_ready(['consumer default#1'])
    deadline = time.monotonic() + 12  # the snapshot is rewritten every 5 s at least
    writes = set()
    while time.monotonic() < deadline:
        if status.exists() and not status.is_symlink():
            writes.add(status.stat().st_mtime_ns)
        time.sleep(0.2)
    assert pidfile.read_text() == f'{sup.pid}\n' and not pidfile.is_symlink()
    assert len(writes) >= 2, 'the status snapshot was not rewritten'
    log = sup.log()
    assert f'the pidfile directory {shared} is writable by other users (sticky)' in log, sup.tail()
    sup.signal(15)
    assert sup.wait_exit(30) == 0
    assert victim.read_text() == 'precious\n'
    leftovers = [p.name for p in shared.iterdir() if not p.is_symlink()]
    assert leftovers == [], leftovers  # no temporary file left behind, pidfile and snapshot removed


def test_the_status_file_replaces_a_link_at_its_name_and_never_follows_one(tmp_path):
    from supervisor.status import StatusFile
    victim = tmp_path / 'victim'
    victim.write_text('precious')
    path = tmp_path / 'status.json'
    path.symlink_to(victim)
    StatusFile(str(path)).write({'version': 1, 'slots': []})
    assert not path.is_symlink() and '"version": 1' in path.read_text()
    assert victim.read_text() == 'precious'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['status.json', 'victim']


# -- a full disk under the log file --------------------------------------------------------------------

FULL_DISK = textwrap.dedent('''
    import logging, resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from carrot.run.logfile import LogFileHandler
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead
    limit = 64 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    log = logging.getLogger('t')
    log.propagate = False
    log.addHandler(LogFileHandler(sys.argv[1]))
    for i in range(30000):
        log.warning('line %d of a task log that goes on and on %s', i, 'x' * 60)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space again
    log.warning('back')
    print('work went on', file=sys.stdout)
''')


def test_a_full_disk_under_the_log_file_says_so_once_per_change_not_per_line(tmp_path):
    logfile = tmp_path / 'carrot.log'
    result = subprocess.run([sys.executable, '-c', FULL_DISK, str(logfile), str(ROOT)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == 'work went on'
    lines = result.stderr.splitlines()
    assert len(lines) == 2, (len(result.stderr), lines[:5])
    assert lines[0] == f'carrot: log lines dropped: cannot write to the log file {logfile}: File too large'
    assert lines[1].startswith(f'carrot: writing to the log file {logfile} again (')
    assert logfile.read_text().splitlines()[-1].endswith('back')
    print(f'FIGURE full_disk_stderr={len(result.stderr)} bytes for 30000 lines')
