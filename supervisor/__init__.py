"""A generic prefork process supervisor: one master, one child process per slot of a plan.

The master (`Arbiter`) forks a child for every slot of the `Plan` it is given, restarts children that
exit (backing off when a slot keeps dying young), kills children that stop sending heartbeats, and
reacts to TERM/INT/QUIT/HUP/USR1/TTIN/TTOU. Children run the slot group's ``target(ctx)`` with a
`ChildContext`. See `supervisor.arbiter` for the rules and `supervisor.exitcodes` for exit codes.

This package knows nothing about Django or the broker: the caller hands it the child bodies.

Note: supervisord's Python package is also called ``supervisor``; install this one in the
application's own virtualenv.
"""

from .arbiter import Arbiter
from .child import ChildContext
from .image import ImageFailed
from .exitcodes import EXIT_BROKER, EXIT_CONFIG, EXIT_CRASHING, EXIT_OK, EXIT_PIDFILE
from .pidfile import Pidfile, PidfileHeld
from .plan import Plan, PlanError, Slot, SlotGroup

__all__ = [
    "Arbiter",
    "ChildContext",
    "ImageFailed",
    "Plan",
    "PlanError",
    "Slot",
    "SlotGroup",
    "Pidfile",
    "PidfileHeld",
    "EXIT_OK",
    "EXIT_CONFIG",
    "EXIT_BROKER",
    "EXIT_PIDFILE",
    "EXIT_CRASHING",
]
