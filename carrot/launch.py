"""How carrot-supervisor starts: before anything slow is imported, the signals the master handles are
held (blocked), so a TERM or a HUP sent in its first moments -- `systemctl reload` right after start, an
impatient Ctrl-C -- waits for the master's loop instead of ending the process by its default action.
The master releases them once its handlers are installed (supervisor.signals.SignalQueue.install)."""
import signal

MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                  signal.SIGTTIN, signal.SIGTTOU)


def hold_master_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)


def release_master_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)


def main() -> None:
    """The carrot-supervisor console script."""
    hold_master_signals()
    from carrot.cli import run
    run()
