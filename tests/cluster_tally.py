"""The tally of a "node dies under load" run (issue 15 §3), shared by tests/test_cluster.py and the
`quorum-leader-killed` scenario of scripts/chaos: from what the run published, the executions its tasks
recorded (one line per run: token pid) and the rows, the figures of one table row and what is wrong.

Plain Python: the callers read the rows and the process tables and hand them in.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

MIN_SHARE = 0.15     # each supervisor ran at least this share of the tasks
MAX_RESUME = 5.0     # seconds from the kill to the first task started (and completed) after it
ANCHOR_SLACK = 0.25  # share of an interval by which a run that starts a schedule's grid may follow its slot


def read_executions(path) -> dict[str, list[int]]:
    """token -> pids of its executions, from the file record_execution appends to."""
    found = defaultdict(list)
    try:
        with open(path) as lines:
            for line in lines:
                token, _, pid = line.strip().partition(' ')
                if pid.isdigit():
                    found[token].append(int(pid))
    except FileNotFoundError:
        pass
    return found


@dataclass
class Tally:
    published: int = 0
    completed: int = 0
    executions: int = 0
    lost: int = 0
    duplicated: int = 0
    shares: dict = field(default_factory=dict)        # supervisor name -> share of the tasks it ran
    schedule_runs: int = 0
    schedule_intervals: int = 0                       # intervals from its first to its last run
    schedule_doubles: int = 0                         # intervals that ran twice
    schedule_missed: int = 0                          # intervals without a run, or the grid shifted by a late run
    schedule_longest_gap: float = 0.0                 # seconds between two consecutive runs at most
    schedule_duplicated: int = 0                      # runs executed more than once
    killed_node: int | None = None
    resumed_after: float | None = None                # seconds from the kill to the first task after it
    longest_pause: float | None = None                # seconds without a completion after the kill at most
    wall: float = 0.0

    def problems(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f'{self.lost} task(s) lost')
        if self.completed != self.published:
            found.append(f'{self.completed} of {self.published} COMPLETED')
        if self.duplicated:
            found.append(f'{self.duplicated} task(s) executed more than once')
        for name, share in sorted(self.shares.items()):
            if share < MIN_SHARE:
                found.append(f'{name} ran {share:.0%} of the tasks (less than {MIN_SHARE:.0%})')
        if self.schedule_doubles or self.schedule_duplicated:
            found.append(f'the schedule ran {self.schedule_doubles} interval(s) twice and '
                         f'{self.schedule_duplicated} run(s) more than once')
        if self.schedule_runs < 2:
            found.append(f'the schedule ran {self.schedule_runs} time(s)')
        if self.killed_node is not None and (self.resumed_after is None or self.resumed_after > MAX_RESUME):
            found.append(f'work resumed {self.resumed_after}s after the kill (more than {MAX_RESUME:g}s)')
        return found

    def figures(self) -> str:
        shares = ' '.join(f'{name} {share:.0%}' for name, share in sorted(self.shares.items()))
        resumed = f'{self.resumed_after:.1f}s' if self.resumed_after is not None else '-'
        pause = f'{self.longest_pause:.1f}s' if self.longest_pause is not None else '-'
        return (f'published {self.published} completed {self.completed} executions {self.executions} '
                f'lost {self.lost} duplicated {self.duplicated}; shares {shares}; schedule '
                f'{self.schedule_runs} runs in {self.schedule_intervals + 1} intervals, doubled '
                f'{self.schedule_doubles}, missed {self.schedule_missed}, longest gap '
                f'{self.schedule_longest_gap:.1f}s; node '
                f'{self.killed_node} killed, work resumed after {resumed}, longest pause {pause}')


def tally(tokens: dict[str, str], rows: dict[str, dict], executions: dict[str, list[int]],
          pids_by_supervisor: dict[str, set[int]], schedule_token: str | None = None,
          schedule_times: list[datetime] = (), schedule_interval: float = 1.0,
          killed_at: datetime | None = None, killed_node: int | None = None) -> Tally:
    """`tokens`: token -> uuid of each published task. `rows`: uuid -> {'status', 'worker', 'started',
    'completed'} of every row of the run (schedule runs too). `schedule_times`: publish times of the
    schedule's runs."""
    result = Tally(published=len(tokens), killed_node=killed_node)
    result.completed = sum(1 for uuid in tokens.values() if rows.get(uuid, {}).get('status') == 'COMPLETED')
    result.executions = sum(len(executions.get(token, ())) for token in tokens)
    result.lost = sum(1 for token in tokens if not executions.get(token))
    result.duplicated = sum(1 for token in tokens if len(executions.get(token, ())) > 1)

    owner = {pid: name for name, pids in pids_by_supervisor.items() for pid in pids}
    ran = defaultdict(int)
    for uuid in tokens.values():
        worker = rows.get(uuid, {}).get('worker') or ''
        pid = worker.rpartition(':')[2]
        if pid.isdigit():
            ran[owner.get(int(pid), '(unknown)')] += 1
    total = sum(ran.values()) or 1
    result.shares = {name: ran.get(name, 0) / total for name in pids_by_supervisor}
    if ran.get('(unknown)'):
        result.shares['(unknown)'] = ran['(unknown)'] / total

    times = sorted(schedule_times)
    result.schedule_runs = len(times)
    if len(times) > 1:
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
        result.schedule_longest_gap = max(gaps)
        result.schedule_doubles, result.schedule_missed = doubled_and_missed(
            [(time - times[0]).total_seconds() for time in times], schedule_interval)
        # On the same grid: every interval that had a run, and every one missed, after the first.
        result.schedule_intervals = result.schedule_runs - result.schedule_doubles + result.schedule_missed - 1
    if schedule_token is not None:
        runs = executions.get(schedule_token, ())
        result.schedule_duplicated = max(0, len(runs) - len(times))

    if killed_at is not None:
        after = [row for row in rows.values() if row.get('started') and row['started'] > killed_at
                 and row.get('completed')]
        if after:
            result.resumed_after = (min(row['completed'] for row in after) - killed_at).total_seconds()
        done = sorted(row['completed'] for row in rows.values() if row.get('completed')
                      and row['completed'] > killed_at)
        if done:
            marks = [killed_at] + done
            result.longest_pause = max((b - a).total_seconds() for a, b in zip(marks, marks[1:]))
    return result


def doubled_and_missed(offsets: list[float], interval: float) -> tuple[int, int]:
    """Intervals that ran twice, and intervals without a run, from the runs' publish times (seconds from
    the first, in order), judged as the scheduler keeps its grid: a run is published at its slot or later,
    by up to a whole interval (found at a scheduler's next tick, later still on a busy machine), and a run
    overdue by a whole interval is published at once and starts the grid anew from there (as does the
    first). So a run very late and the next one on time may come a few milliseconds apart without any
    interval running twice; two runs ran one interval twice only when no slot of the grid can lie between
    them. Where the grid starts is known to within ANCHOR_SLACK of an interval (its first run's row is
    written a moment after its slot): a second run inside that window before a slot is not counted."""
    doubled = missed = 0
    anchor = previous = 0.0
    for offset in offsets[1:]:
        cells = math.floor((offset - anchor) / interval) - math.floor((previous - anchor) / interval)
        if cells > 1:  # a whole interval without a run: the scheduler starts the grid again from this one
            missed += cells - 1
            anchor = offset
        else:
            next_slot = anchor + (math.floor((previous - anchor) / interval) + 1) * interval
            if offset < next_slot - ANCHOR_SLACK * interval:
                doubled += 1
        previous = offset
    return doubled, missed
