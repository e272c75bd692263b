"""`python -m carrot.cli`: carrot-supervisor, as `manage.py carrot` starts it (carrot.run.cli does the work).

The master's signals are held first, as the console script (carrot.launch) does, so a TERM or HUP sent
while Python imports the rest is handled by the master's loop, not by the default action.
"""
if __name__ == '__main__':
    from supervisor.signals import hold_master_signals
    hold_master_signals()

from carrot.run.cli import main, run  # noqa: E402

__all__ = ['main', 'run']

if __name__ == '__main__':
    run()
