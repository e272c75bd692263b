"""--autoreload: watch the project's Python files with Django's own autoreloader, and reload on a change.

The master never imports Django, so the watching happens beside the image that has the project loaded:
with --autoreload, each image forks a small watcher process once it is built. The watcher runs Django's
reloader (`django.utils.autoreload.get_reloader()`: Watchman when available, else the stat poller) over
the files it knows about -- every imported module of the image, settings and task modules included --
and turns a change into a SIGHUP to the master: a new image is built and the children are rolled over to
it, exactly as for a HUP. A broken edit fails the new image; the old image, its children and its watcher
stay, and the next edit triggers the next attempt. The watcher dies with its image (PDEATHSIG).
"""
from __future__ import annotations

import logging
import os
import signal

from supervisor.procs import die_with_parent, set_title

logger = logging.getLogger('carrot.autoreload')


def start_watcher(master_pid: int, generation: int, proc_name: str = 'carrot-supervisor') -> int:
    """Fork the watcher of image `generation` (call it in the image once it is built); its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        die_with_parent()
        set_title(f'{proc_name}: autoreload watcher (image {generation})')
        watch(master_pid)
        code = 0
    except BaseException:
        logger.exception('autoreload watcher failed')
    finally:
        os._exit(code)


def watch(master_pid: int) -> None:
    from django.utils import autoreload

    def changed(sender, file_path, **kwargs):
        logger.info('autoreload: %s changed; reloading', file_path)
        try:
            os.kill(master_pid, signal.SIGHUP)
        except ProcessLookupError:
            os._exit(0)
        return True  # handled: Django's own restart-the-process reaction must not run

    autoreload.file_changed.connect(changed, weak=False)
    reloader = autoreload.get_reloader()
    for _ in reloader.tick():
        if os.getppid() == 1:  # the image is gone (where PDEATHSIG does not apply)
            return
