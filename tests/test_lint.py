"""pyflakes finds nothing in carrot/, supervisor/, tests/ and scripts/ (unused imports and names, undefined
names; fixtures live in conftest.py, so no test imports one just to use it)."""
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyflakes_is_clean():
    result = subprocess.run([sys.executable, '-m', 'pyflakes', 'carrot', 'supervisor', 'tests',
                             *glob.glob(os.path.join(ROOT, 'scripts', '*.py'))], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert 'No module named pyflakes' not in result.stderr, 'pip install -e .[test] (pyflakes is a test extra)'
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr
