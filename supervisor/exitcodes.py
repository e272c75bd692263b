"""Exit codes of the supervisor master.

`Arbiter.run()` returns one of these; the command that wraps it passes it to `sys.exit()`. They are
chosen so that a systemd unit or a shell script can tell the cases apart, and they avoid 1 (what an
uncaught Python exception gives) and 2 (what argparse gives for a bad command line), so a code from
this table always means the master decided it.

======  ================  =================================================================
code    name              meaning
======  ================  =================================================================
0       EXIT_OK           stopped on request (TERM, INT, QUIT), children gone
3       EXIT_CONFIG       the first image failed (settings, checks or code broken); nothing
                          was started
4       EXIT_BROKER       the first image said so (carrot: a broker unreachable at start)
5       EXIT_PIDFILE      the pidfile is held by a live process (or could not be written);
                          nothing was started
6       EXIT_CRASHING     every slot was parked (its children kept dying young,
                          max_consecutive_failures in a row); the master killed every child
                          and gave up. One parked slot alone never stops the master.
======  ================  =================================================================

With systemd, `RestartPreventExitStatus=3 5` keeps a unit from restarting in a loop on a
configuration mistake that a restart cannot fix.
"""

EXIT_OK = 0
EXIT_CONFIG = 3
EXIT_BROKER = 4
EXIT_PIDFILE = 5
EXIT_CRASHING = 6

__all__ = ["EXIT_OK", "EXIT_CONFIG", "EXIT_BROKER", "EXIT_PIDFILE", "EXIT_CRASHING"]
