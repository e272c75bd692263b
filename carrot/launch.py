"""The carrot-supervisor console script. Before anything slow is imported, the signals the master
handles are held (blocked), so a TERM or a HUP sent in its first moments -- `systemctl reload` right
after start, an impatient Ctrl-C -- waits for the master's loop instead of ending the process by its
default action. The master releases them once its handlers are installed (SignalQueue.install)."""
from supervisor.signals import hold_master_signals


def main() -> None:
    hold_master_signals()
    from carrot.run.cli import run
    run()
