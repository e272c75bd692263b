"""A generic prefork process supervisor: one master, one warm image per generation, one child per slot.

The master (`Arbiter`) never imports the application. For each generation (start, HUP, a dead image)
it forks an image process that calls the caller's ``build(generation)`` -> ``(Plan, options)`` once,
freezes its heap and forks the slot children on the master's request (image.py); the children are
re-parented to the master, which reaps, heartbeats, restarts (backing off, parking a slot that keeps
failing: restarts.py), reloads and stops them. See `supervisor.arbiter` for the rules and
`supervisor.exitcodes` for exit codes.

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
