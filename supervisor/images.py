"""The master's side of its images: a handle on each image process (`Image`) and the set of them.

An image (image.py) is forked by `start_image()` for every generation: at start, on HUP, after a dead
image. The master keeps a handle on each until it is reaped: the channel to it (protocol.py), its state
(starting -> up -> retiring; or starting -> failed), the plan it serves and the spawn requests it has
not answered. `ImageSet` knows which image serves, which is being built, and when to try again after
one died. Like the child table, it is a passive part of the master: the arbiter decides.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .image import Build, run_image
from .plan import Plan
from .protocol import MAX_PACKET, Eof, Message, Spawn, decode


@dataclass(eq=False)
class Image:
    """The master's handle on one image process."""
    pid: int
    generation: int
    sock: socket.socket
    started_at: float
    state: str = "starting"  # starting -> up -> retiring; or starting -> failed
    plan: Plan | None = None  # the shape of the plan it serves, once up
    error: str | None = None  # why it failed
    outstanding: set = field(default_factory=set)  # spawn requests not answered yet
    _next_request: int = 0

    def describe(self) -> str:
        return f"image generation {self.generation} (pid {self.pid})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def request_spawn(self, slot_name: str, group: str, index: int, beat_fd: int, beat_interval: float) -> int | None:
        """Ask for a child; returns the request id, or None if the image cannot be reached."""
        self._next_request += 1
        request = Spawn(self._next_request, slot_name, group, index, beat_interval)
        try:
            socket.send_fds(self.sock, [request.encode()], [beat_fd])
        except OSError:
            return None
        self.outstanding.add(self._next_request)
        return self._next_request

    def answered(self, request: int) -> None:
        """`request` is settled: the image answered it, or the master stopped waiting for the answer."""
        self.outstanding.discard(request)

    def forget_requests(self) -> None:
        """No request will be answered any more: the image has closed its channel or is gone."""
        self.outstanding.clear()

    def receive(self) -> list[Message]:
        """Every message waiting on the channel, ending in Eof once the image has closed it."""
        messages: list[Message] = []
        while True:
            try:
                data = self.sock.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError:
                data = b""
            message = decode(data)
            if message is not None:  # junk is skipped
                messages.append(message)
            if isinstance(message, Eof):
                return messages

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()


def start_image(build: Build, generation: int, *, master_pid: int, proc_name: str, close_fds: Iterable[int],
                blocked: Iterable[int], reopen_logs: Callable[[], None] | None,
                on_fork: Callable[[], None] | None, logger: logging.Logger) -> Image:
    """Fork the image process of `generation` (the master's side; returns at once)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        try:
            ours.close()
            run_image(theirs, build, generation, master_pid=master_pid, proc_name=proc_name,
                      close_fds=close_fds, sigmask=mask, reopen_logs=reopen_logs, on_fork=on_fork, logger=logger)
        finally:
            os._exit(1)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    theirs.close()
    ours.setblocking(False)
    return Image(pid=pid, generation=generation, sock=ours, started_at=time.monotonic())


class ImageSet:
    """The master's images: every image process not reaped yet, the one serving, the one being built."""

    def __init__(self, poller) -> None:
        self.poller = poller
        self.by_pid: dict[int, Image] = {}
        self.serving: Image | None = None
        self.building: Image | None = None
        self.retry_at: float | None = None  # when to build a replacement for a dead serving image

    def __bool__(self) -> bool:
        return bool(self.by_pid)

    def fds(self) -> list[int]:
        return [image.fileno() for image in self.by_pid.values() if image.fileno() >= 0]

    def add(self, image: Image) -> None:
        self.by_pid[image.pid] = image
        self.poller.register(image.fileno(), select.POLLIN)
        self.building, self.retry_at = image, None

    def close_channel(self, image: Image) -> None:
        if image.fileno() >= 0:
            self.poller.unregister(image.fileno())
            image.close()

    def fail(self, image: Image, error: str) -> bool:
        """`image` cannot serve (`error`). True if it was the one being built, which none is now; False
        for an image nobody waits for (superseded by a newer reload)."""
        image.state, image.error = "failed", error
        if image is not self.building:
            return False
        self.building = None
        return True

    def promote(self, image: Image, plan: Plan) -> Image | None:
        """`image` is up and serves `plan` from now on; returns the image it replaces (now retiring: its
        channel is closed once it has answered every request)."""
        old, self.serving, self.building = self.serving, image, None
        image.state, image.plan = "up", plan
        if old is not None:
            old.state = "retiring"
        return old

    def serving_died(self, now: float) -> None:
        self.serving, self.retry_at = None, now

    def retry_from(self, when: float) -> None:
        """With no image serving: build a replacement from `when` on (see replacement_due)."""
        self.retry_at = when

    def replacement_due(self, now: float) -> bool:
        """No image serves or is being built, and the wait after a dead or failed one is over."""
        return self.serving is None and self.building is None and self.retry_at is not None \
            and now >= self.retry_at

    def kill(self, image: Image) -> None:
        image.state = "retiring"
        if image is self.building:
            self.building = None
        try:
            os.kill(image.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill_all(self) -> None:
        for image in self.by_pid.values():
            self.kill(image)
        self.serving = None

    def forget(self, pid: int) -> Image:
        image = self.by_pid.pop(pid)
        self.close_channel(image)
        return image

    def messages(self) -> list[tuple[Image, Message]]:
        """What the images said since the last call. A retired image's channel is closed once it has
        answered every request: the EOF tells it to exit."""
        found = []
        for image in list(self.by_pid.values()):
            if image.fileno() < 0:
                continue
            for message in image.receive():
                if isinstance(message, Eof):
                    self.close_channel(image)
                found.append((image, message))
            if image.state == "retiring" and not image.outstanding:
                self.close_channel(image)
        return found

    def close_all(self) -> None:
        for image in self.by_pid.values():
            image.close()
        self.by_pid.clear()
