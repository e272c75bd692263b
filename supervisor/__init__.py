"""A generic prefork process supervisor: one master, one warm image per generation, one child per slot.

The master (`Arbiter`) never imports the application. For each generation (start, HUP, a dead image)
it forks an image process that calls the caller's ``build(generation)`` -> ``(Plan, options)`` once,
freezes its heap and forks the slot children on the master's request (image.py); the children are
re-parented to the master, which reaps, heartbeats, restarts (backing off, parking a slot that keeps
failing: restarts.py), reloads and stops them. See `supervisor.arbiter` for the rules and
`supervisor.exitcodes` for exit codes.

This package knows nothing about Django or the broker: the caller hands it the child bodies.

    arbiter     the master's loop: one method per signal, spawn, reap, retire, stop
    plan        what to run: groups of slots (SlotGroup in the image, its GroupShape in the master)
    protocol    what master, image and children say to each other
    image       the image process: build once, fork a child on request
    images      the master's handles on its images
    children    the master's table of children and their heartbeat pipes
    restarts    when to restart a slot: backoff and parking
    child       the child side of a fork (ChildContext, run_child)
    procs       OS helpers: titles, prctl, reaping, the way out of a forked process
    signals, readiness, sdnotify, pidfile, status, exitcodes

The names below are imported on first use, so that `supervisor.signals` can be imported (to hold the
master's signals) before anything else of the package is loaded.

Note: supervisord's Python package is also called ``supervisor``; install this one in the
application's own virtualenv.
"""
import importlib

_EXPORTS = {
    "Arbiter": ".arbiter",
    "ChildContext": ".child",
    "ImageFailed": ".image",
    "Plan": ".plan",
    "GroupShape": ".plan",
    "PlanError": ".plan",
    "Slot": ".plan",
    "SlotGroup": ".plan",
    "Pidfile": ".pidfile",
    "PidfileHeld": ".pidfile",
    "EXIT_OK": ".exitcodes",
    "EXIT_CONFIG": ".exitcodes",
    "EXIT_BROKER": ".exitcodes",
    "EXIT_PIDFILE": ".exitcodes",
    "EXIT_CRASHING": ".exitcodes",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
