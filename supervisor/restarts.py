"""When to restart a slot's child: pure decisions, no processes, no clock of their own.

A slot is one place in the plan ("consumer default#2"). Its child can leave in four ways, and only
one of them counts against the slot:

- asked to go (reload, scale down, stop): no failure; the slot is refilled at once.
- lived `min_uptime`, or said it was up and able to work (a consumer that reached its queue): a task
  problem at worst, which the message's attempts deal with; the slot's failure count resets.
- exited 0 young: a clean exit (a recycled child); refilled at once, the count unchanged.
- anything else young (non-zero exit, a signal, killed for missing heartbeats): a failure to start.
  The slot waits ``backoff_base * 2**(n-1)`` (at most `backoff_cap`) before the next start, n being
  its failures in a row. At `park_after` failures in a row the slot is *parked*: still retried, but
  with the wait capped at `park_cap` (about a minute) instead, and reported as parked until a child
  of it stays up. One parked slot never stops the others; the master gives up only when every slot
  is parked (`all_parked`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class RestartPolicy:
    min_uptime: float = 5.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    park_after: int = 10
    park_cap: float = 60.0

    def __post_init__(self) -> None:
        if self.park_after < 1:
            raise ValueError("park_after must be >= 1")
        if min(self.backoff_base, self.backoff_cap, self.park_cap) <= 0:
            raise ValueError("backoff_base, backoff_cap and park_cap must be > 0")


@dataclass
class SlotRecord:
    """What the master remembers about one slot between its children."""
    failures: int = 0  # young failures in a row
    next_start: float = 0.0  # monotonic time before which the slot stays empty
    parked: bool = False
    problem: str | None = None  # why it is backing off or parked, for the log, title and snapshot
    restarts: int = 0


@dataclass(frozen=True)
class Verdict:
    failure: bool  # the exit counts against the slot
    failures: int  # the slot's young failures in a row after this exit
    delay: float  # seconds before the slot gets a new child
    parked: bool


def judge_exit(policy: RestartPolicy, failures: int, *, uptime: float, code: int, was_working: bool,
               retiring: bool) -> Verdict:
    """The verdict on one child's exit. `code` is an exit code, or minus the signal that ended it."""
    if retiring:
        return Verdict(False, failures, 0.0, False)
    if was_working or uptime >= policy.min_uptime:
        return Verdict(False, 0, 0.0, False)
    if code == 0:
        return Verdict(False, failures, 0.0, failures >= policy.park_after)
    failures += 1
    return Verdict(True, failures, backoff(policy, failures), failures >= policy.park_after)


def backoff(policy: RestartPolicy, failures: int) -> float:
    """Seconds to wait after `failures` young failures in a row (>= 1)."""
    delay = policy.backoff_base * 2 ** min(failures - 1, 30)
    if failures >= policy.park_after:
        return min(policy.park_cap, max(policy.backoff_cap, delay))
    return min(policy.backoff_cap, delay)


def all_parked(records: dict[str, SlotRecord], auxiliary: frozenset[str] = frozenset()) -> bool:
    """True when no slot that matters can stay up: the master should give up (EXIT_CRASHING). Auxiliary
    slots (plan.GroupShape.auxiliary) do not count; a plan of auxiliary slots alone never gives up."""
    essential = [record for name, record in records.items() if name not in auxiliary]
    return bool(essential) and all(record.parked for record in essential)


class SlotBook:
    """The restart records of the current plan's slots: a passive part of the master.

    `record_exit` applies `judge_exit` to a slot and says what to log; `record_working` clears a slot
    whose child now works; `hold` keeps a slot empty for a while (its image could not be asked).
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.records: dict[str, SlotRecord] = {}
        self.auxiliary: frozenset[str] = frozenset()

    def reset(self, slot_names: list[str], *, fresh: bool, auxiliary: Iterable[str] = ()) -> None:
        """Records for exactly `slot_names`; `fresh` forgets failures and backoff (a new image).
        `auxiliary` names the slots whose parking does not count in `all_parked`."""
        old = {} if fresh else self.records
        self.records = {name: old.get(name) or SlotRecord() for name in slot_names}
        self.auxiliary = frozenset(auxiliary)

    def __contains__(self, slot: str) -> bool:
        return slot in self.records

    def next_start(self, slot: str) -> float:
        """The monotonic time before which `slot` stays empty."""
        return self.records[slot].next_start

    def hold(self, slot: str, until: float) -> None:
        """Keep `slot` empty until `until` (a slot no longer in the plan has nothing to hold)."""
        if slot in self.records:
            self.records[slot].next_start = until

    def record_exit(self, slot: str, *, uptime: float, code: int, how: str, was_working: bool,
                    now: float) -> tuple[Verdict, int, str | None]:
        """(verdict, log level, log message or None) for the exit of `slot`'s child."""
        record = self.records[slot]
        record.restarts += 1
        verdict = judge_exit(self.policy, record.failures, uptime=uptime, code=code, was_working=was_working,
                             retiring=False)
        record.failures, record.next_start = verdict.failures, now + verdict.delay
        if not verdict.failure:
            return verdict, 0, None
        record.problem = f"died young {verdict.failures} times in a row (last: {how} after {uptime:.1f}s)"
        if verdict.parked and not record.parked:
            record.parked = True
            return verdict, 40, (f"slot {slot} {record.problem}; parked: retrying with a backoff of up to "
                                 f"{self.policy.park_cap:.0f}s; the other slots run on")
        if verdict.parked:
            return verdict, 30, (f"slot {slot} is still parked ({verdict.failures} failures in a row); "
                                 f"next start in {verdict.delay:.1f}s")
        return verdict, 30, (f"slot {slot} keeps dying young ({verdict.failures} consecutive); "
                             f"next start in {verdict.delay:.1f}s")

    def record_working(self, slot: str) -> str | None:
        """The slot's child works (or has lived min_uptime): no longer failing. A message if it was parked."""
        record = self.records.get(slot)
        if record is None or not record.failures:
            return None
        was_parked = record.parked
        record.failures, record.parked, record.problem = 0, False, None
        return f"slot {slot} is up again; no longer parked" if was_parked else None

    def note_working(self, children, now: float) -> list[str]:
        """Clear the slots of `children` (records with .slot, .working, .started_at) that work or have
        lived min_uptime; returns what to log (slots that are no longer parked)."""
        return [message for child in children
                if child.working or now - child.started_at >= self.policy.min_uptime
                if (message := self.record_working(child.slot))]

    def parked(self) -> list[str]:
        return [name for name, record in self.records.items() if record.parked]

    def all_parked(self) -> bool:
        return all_parked(self.records, self.auxiliary)
