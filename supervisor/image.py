"""The warm image: one process per settings generation that builds the plan once and forks children.

The master forks an image for every generation (start, HUP, a dead image). The image calls the
caller's ``build(generation)`` -- for carrot: set Django up, run the checks, import the task modules,
close every connection -- freezes the heap (gc.freeze(), so children share its pages), tells the master
the plan, and from then on forks a child whenever the master asks. A file broken on disk later never
reaches a child: children run the image's code, which was imported when the image was built.

Children must stay the master's own: it reaps, signals and heartbeats them directly. So the image forks
through a middle process that exits at once; the child is re-parented to the master, which made
itself a child subreaper (PR_SET_CHILD_SUBREAPER). The image answers with the child's pid.

Master and image talk over a socket pair; the messages are in protocol.py. EOF on the channel tells
the image that the master is gone or has retired it: it exits.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
from typing import Callable, Iterable, NoReturn

from .child import ChildContext, run_child
from .exitcodes import EXIT_CONFIG
from .plan import Plan
from .procs import die_with_parent, flush_and_exit, forget_master, set_title
from .protocol import MAX_PACKET, Eof, Failed, Message, Ready, Spawn, Spawned, SpawnFailed, decode

# The image blocks these around fork(): a TERM sent to a brand-new child before it has installed its
# own handlers would otherwise run the image's (default: die) instead of a graceful stop.
CHILD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT)
# The master's signals are its own: the image ignores reload/scale/log signals and Ctrl-C (the master
# stops it), and dies on TERM/QUIT.
_IGNORED_IN_IMAGE = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU)


class ImageFailed(Exception):
    """The image cannot serve: settings, checks or code are broken. `exit_code` is what it means for a
    master that has nothing running yet (EXIT_CONFIG, or e.g. EXIT_BROKER)."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


Build = Callable[[int], "tuple[Plan, dict]"]


def run_image(sock: socket.socket, build: Build, generation: int, *, master_pid: int, proc_name: str,
              close_fds: Iterable[int], sigmask: Iterable[int], reopen_logs: Callable[[], None] | None,
              on_fork: Callable[[], None] | None, logger: logging.Logger) -> NoReturn:
    code = 1
    try:
        _become_image(close_fds, sigmask)
        die_with_parent()
        if os.getppid() != master_pid:
            os._exit(0)  # the master died between fork() and here
        set_title(f"{proc_name}: image {generation} starting")
        try:
            # Importing Django and the project makes long-lived objects, hardly any garbage, yet it set the
            # collector off about 170 times: a tenth of the build's CPU (30-80 ms). One collection at the
            # end does the work instead.
            gc.disable()
            plan, options = build(generation)
            gc.collect()
            # Everything built so far stays where it is: the collector never touches (and so never
            # dirties) these pages again, in the image or in the children that share them.
            gc.freeze()
            gc.enable()  # children inherit it on: a task's garbage is collected as usual
        except ImageFailed as exc:
            _send(sock, Failed(_one_line(exc), exc.exit_code))
            flush_and_exit(0)
        except BaseException as exc:
            logger.debug("image build failed", exc_info=True)
            _send(sock, Failed(_one_line(exc), EXIT_CONFIG))
            flush_and_exit(0)
        _send(sock, Ready(tuple(plan.shape()), options))
        set_title(f"{proc_name}: image {generation}")
        serve(sock, plan, generation=generation, master_pid=master_pid, proc_name=proc_name,
              reopen_logs=reopen_logs, on_fork=on_fork, logger=logger)
        code = 0
    except BaseException:
        logger.exception("image generation %d (pid %d) failed", generation, os.getpid())
    finally:
        flush_and_exit(code)


def _become_image(close_fds: Iterable[int], sigmask: Iterable[int]) -> None:
    signal.set_wakeup_fd(-1)  # the master's self-pipe
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for signum in _IGNORED_IN_IMAGE:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
    forget_master(close_fds)


def serve(sock: socket.socket, plan: Plan, *, generation: int, master_pid: int, proc_name: str,
          reopen_logs, on_fork, logger: logging.Logger) -> None:
    """Fork a child for every request until the master closes the channel."""
    groups = {group.name: group for group in plan.groups}
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_PACKET, 4)
        except InterruptedError:
            continue
        match decode(data):
            case Eof():
                return
            case Spawn() as request if request.group in groups and len(fds) == 1:
                ctx = ChildContext(slot=request.slot, group=request.group, index=request.index,
                                   master_pid=master_pid, proc_name=proc_name, heartbeat_fd=fds[0],
                                   beat_interval=request.beat_interval, generation=generation)
                try:
                    _send(sock, spawn(request, ctx, groups[request.group].target, sock, reopen_logs=reopen_logs,
                                      on_fork=on_fork, logger=logger))
                finally:
                    os.close(fds[0])  # the child has its copy
            case Spawn() as request:
                _close(fds)
                _send(sock, SpawnFailed(request.request, f"no group {request.group!r} in this image"))
            case _:
                _close(fds)  # unreadable: skipped


def spawn(request: Spawn, ctx: ChildContext, target, sock: socket.socket, **hooks) -> Spawned | SpawnFailed:
    """The answer to `request`: the pid of the child forked for it, or why there is none."""
    try:
        pid = fork_child(ctx, target, sock, **hooks)
    except OSError as exc:
        return SpawnFailed(request.request, f"cannot fork: {exc}")
    return Spawned(request.request, pid)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def fork_child(ctx: ChildContext, target, sock: socket.socket, *, reopen_logs, on_fork, logger) -> int:
    """Fork the child through a middle process that exits at once; returns the child's pid."""
    pid_r, pid_w = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
    try:
        middle = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(pid_r)
        os.close(pid_w)
        raise
    if middle == 0:
        try:
            os.close(pid_r)
            pid = os.fork()
            if pid == 0:
                os.close(pid_w)
                run_child(ctx, target, close_fds=[sock.fileno()], sigmask=mask, reopen_logs=reopen_logs,
                          on_fork=on_fork, logger=logger)
            os.write(pid_w, str(pid).encode())
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(pid_w)
    try:
        data = b""
        while chunk := os.read(pid_r, 32):
            data += chunk
    finally:
        os.close(pid_r)
        os.waitpid(middle, 0)
    if not data:
        raise OSError("the middle process could not fork")
    return int(data)


def _send(sock: socket.socket, message: Message) -> None:
    try:
        sock.send(message.encode()[:MAX_PACKET])
    except OSError:
        pass  # the master is gone: the next recv sees EOF


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
