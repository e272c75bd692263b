"""`scripts/chaos --short` in CI: a subset of the fault scenarios (issue 6 §9) against private RabbitMQ and
PostgreSQL instances the script starts and removes itself. It fails on any lost message, any duplicate
execution outside the at-least-once window, or a scenario that breaks; the table is in the output.

It runs once per `scripts/test` run, in the PostgreSQL pass (it uses its own PostgreSQL either way).
Needs root (or the postgres and rabbitmq users' rights) to start the private services.
"""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get('CARROT_TEST_DB', 'sqlite') != 'postgres',
                    reason='runs once, in the PostgreSQL pass of scripts/test')
def test_short_chaos_run_loses_nothing_and_runs_nothing_twice_without_cause():
    result = subprocess.run([str(ROOT / 'scripts' / 'chaos'), '--short'], capture_output=True, text=True,
                            timeout=840, cwd=ROOT)
    print(result.stdout[-6000:])
    assert result.returncode == 0, f'scripts/chaos --short exited {result.returncode}:\n' \
                                   f'{result.stdout[-6000:]}\n{result.stderr[-3000:]}'
