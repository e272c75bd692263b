"""The chaos and cluster runs' judgement of a shared schedule (tests/cluster_tally.py): which intervals
ran twice and which were missed, from the runs' publish times alone. Plain Python, no services."""
import pytest

from tests.cluster_tally import doubled_and_missed

# A one-second schedule seen by three schedulers in scripts/chaos (quorum-leader-killed, stop 22): each
# run found a little later than the last at the schedulers' ticks, until slot 28 went out 0.972 s late and
# slot 29 on time 36 ms after it -- every interval ran once.
LATE_THEN_ON_TIME = [0.0, 1.052, 2.078, 3.146, 4.183, 5.204, 6.262, 7.319, 8.374, 9.421, 10.451, 11.46, 12.493,
                     13.514, 14.538, 15.558, 16.578, 17.597, 18.621, 19.652, 20.673, 21.693, 22.774, 23.791,
                     24.843, 25.874, 26.907, 27.915, 28.972, 29.008, 30.01, 31.035, 32.069, 33.121, 34.131, 35.145]


@pytest.mark.parametrize('offsets, expected', [
    ([0.0, 1.0, 2.0, 3.0], (0, 0)),
    ([0.0, 1.03, 2.06, 3.09, 4.12], (0, 0)),                 # found a little later each time
    (LATE_THEN_ON_TIME, (0, 0)),
    ([0.0, 1.0, 2.6, 3.0, 4.0], (0, 0)),                     # one row written late, the next on time
    ([0.0, 1.01, 1.03, 2.0], (1, 0)),                        # two schedulers published slot 1
    ([0.0, 1.0, 2.0, 2.0, 3.0], (1, 0)),
    ([0.0, 1.0, 3.5, 4.52, 5.5], (0, 1)),                    # slot 2 missed; the grid starts again at 3.5
    ([0.0, 1.0, 3.5, 3.6, 4.52], (1, 1)),
    ([0.0, 1.0, 5.2, 6.2], (0, 3)),                          # the scheduler away for three slots
])
def test_doubled_and_missed_intervals_of_a_one_second_schedule(offsets, expected):
    assert doubled_and_missed(offsets, 1.0) == expected


def test_the_judgement_scales_with_the_interval():
    assert doubled_and_missed([t * 60 for t in LATE_THEN_ON_TIME], 60.0) == (0, 0)
    assert doubled_and_missed([0.0, 60.5, 61.0], 60.0) == (1, 0)
