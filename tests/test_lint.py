"""pyflakes finds nothing in carrot/ and supervisor/ (unused imports and names, undefined names)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyflakes_is_clean_on_carrot_and_supervisor():
    result = subprocess.run([sys.executable, '-m', 'pyflakes', 'carrot', 'supervisor'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert 'No module named pyflakes' not in result.stderr, 'pip install -e .[test] (pyflakes is a test extra)'
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr
