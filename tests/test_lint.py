"""pyflakes finds nothing in carrot/, supervisor/ and the tests listed here (unused imports and names,
undefined names). Add a test file to CLEAN_TESTS once it is clean; all of tests/ is the goal."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEAN_TESTS = ['tests/test_options.py', 'tests/test_commands.py', 'tests/test_config.py', 'tests/test_lint.py',
               'tests/test_hostile_messages.py', 'tests/test_hostile_schedules.py', 'tests/test_hostile_tasks.py',
               'tests/test_fuzz_config.py', 'tests/test_chaos.py', 'tests/test_hostile_signals.py']


def test_pyflakes_is_clean():
    result = subprocess.run([sys.executable, '-m', 'pyflakes', 'carrot', 'supervisor', *CLEAN_TESTS], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert 'No module named pyflakes' not in result.stderr, 'pip install -e .[test] (pyflakes is a test extra)'
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr
