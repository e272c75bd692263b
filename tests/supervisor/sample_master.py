"""A small program built on supervisor.Arbiter, for the process-level tests.

    python tests/supervisor/sample_master.py --state-dir DIR [--pidfile P] [--graceful-timeout S]
        [--heartbeat-timeout S] [--min-uptime S] [--max-consecutive-failures N] ...

The plan comes from DIR/plan.json, read at start and on every HUP, so a test can edit it:

    {"groups": [{"name": "consumer default", "size": 2, "behaviour": "sleep", "scalable": true},
                {"name": "scheduler", "numbered": false, "behaviour": "sleep"}]}

Behaviours of a group's children (``seconds`` parametrises the last three):
    sleep      heartbeat every 0.2 s, exit 0 once asked to stop
    crash      exit 1 at once
    hang       heartbeat for ``after`` seconds (default 0), then stop heartbeating and ignore TERM
    slow_stop  like sleep, but keep running ``seconds`` after TERM before exiting 0
    work       run back-to-back tasks of ``seconds`` each; on TERM finish the task in hand, write
               DIR/finished/<pid>, exit 0

Every child writes DIR/children/<pid>.json when it starts. Logs go to DIR/master.log; USR1 reopens it
and writes DIR/reopened/<pid> (in the master and in each child).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from supervisor import Arbiter, ChildContext, Plan, SlotGroup  # noqa: E402

BEAT = 0.2
log = logging.getLogger("sample")


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def beat_for(ctx: ChildContext, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.heartbeat()
        time.sleep(min(BEAT, max(0.0, deadline - time.monotonic())))


def child_body(state_dir: Path, spec: dict, ctx: ChildContext) -> int:
    behaviour = spec.get("behaviour", "sleep")
    seconds = float(spec.get("seconds", 1.0))
    write_json(
        state_dir / "children" / f"{os.getpid()}.json",
        {"pid": os.getpid(), "slot": ctx.slot, "group": ctx.group, "index": ctx.index,
         "started": time.time(), "behaviour": behaviour},
    )
    if behaviour == "crash":
        ctx.set_title("crashing")
        return 1
    if behaviour == "hang":
        ctx.set_title("idle")
        beat_for(ctx, float(spec.get("after", 0.0)))
        ctx.set_title("hung")
        while True:
            time.sleep(1)
    if behaviour == "work":
        return work(state_dir, ctx, seconds)
    ctx.set_title("idle")
    ctx.heartbeat()
    while not ctx.stopping.wait(BEAT):
        ctx.heartbeat()
    if behaviour == "slow_stop":
        ctx.set_title("stopping")
        beat_for(ctx, seconds)
    return 0


def work(state_dir: Path, ctx: ChildContext, seconds: float) -> int:
    done = 0
    started = None
    while not ctx.stopping.is_set():
        ctx.set_title("working")
        started = time.time()
        beat_for(ctx, seconds)  # the task in hand: TERM does not cut it short
        done += 1
        log.info("%s finished task %d", ctx.slot, done)
    write_json(state_dir / "finished" / str(os.getpid()),
               {"pid": os.getpid(), "slot": ctx.slot, "tasks": done, "last_started": started,
                "finished": time.time()})
    return 0


def build(state_dir: Path, generation: int) -> tuple[Plan, dict]:
    """The image's build: the plan from plan.json (read in the image, at start and on every HUP)."""
    return load_plan(state_dir), {}


def load_plan(state_dir: Path) -> Plan:
    spec = json.loads((state_dir / "plan.json").read_text())
    groups = []
    for group in spec["groups"]:
        groups.append(SlotGroup(
            name=group["name"],
            size=group.get("size", 1),
            target=functools.partial(child_body, state_dir, group),
            scalable=group.get("scalable", False),
            numbered=group.get("numbered", True),
        ))
    return Plan(tuple(groups))


def configure_logging(state_dir: Path) -> logging.FileHandler:
    handler = logging.FileHandler(state_dir / "master.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return handler


def make_reopen(state_dir: Path, handler: logging.FileHandler):
    def reopen_logs() -> None:
        with handler.lock:
            if handler.stream is not None:
                handler.stream.close()
            handler.stream = handler._open()
        write_json(state_dir / "reopened" / str(os.getpid()), {"pid": os.getpid(), "at": time.time()})
    return reopen_logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--pidfile")
    parser.add_argument("--proc-name", default="carrot-supervisor")
    parser.add_argument("--title", default="master")
    parser.add_argument("--graceful-timeout", type=float, default=5.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--min-uptime", type=float, default=1.0)
    parser.add_argument("--backoff-base", type=float, default=0.1)
    parser.add_argument("--backoff-cap", type=float, default=1.0)
    parser.add_argument("--max-consecutive-failures", type=int, default=5)
    args = parser.parse_args(argv)

    state_dir = args.state_dir.resolve()
    handler = configure_logging(state_dir)
    arbiter = Arbiter(
        functools.partial(build, state_dir),
        title=args.title,
        proc_name=args.proc_name,
        graceful_timeout=args.graceful_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        pidfile=args.pidfile,
        reopen_logs=make_reopen(state_dir, handler),
        min_uptime=args.min_uptime,
        backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap,
        max_consecutive_failures=args.max_consecutive_failures,
    )
    return arbiter.run()


if __name__ == "__main__":
    sys.exit(main())
