"""What the master should be running: groups of slots, one child process per slot.

A plan is a value. The caller's build (in the image) makes one whose groups are `SlotGroup`s: each
says what its children run (`target`). The master never imports the application, so it never holds a
target: the image sends it the plan's shape (`Plan.shape()`, protocol.Ready) and the master's copy
(`Plan.from_shape()`) is made of `GroupShape`s, the same groups without their targets. The master compares
nothing inside a plan but the slot names: a slot that exists in the old and the new plan keeps its name,
so its old child is replaced by a new one rather than joined by it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

if TYPE_CHECKING:
    from .child import ChildContext


class PlanError(ValueError):
    """A plan that the master cannot run: a bad size, a duplicate name, a target that is no callable."""


@dataclass(frozen=True)
class GroupShape:
    """`size` identical slots: a group as the master knows it.

    Slot names are ``f"{name}#{i}"`` for i in 1..size, or just ``name`` when ``numbered`` is false
    (a singleton such as the scheduler, whose size must be 1). A group of size 0 has no slots.
    ``scalable`` groups follow TTIN/TTOU. An ``auxiliary`` group is kept filled like any other, but it is
    not the master's reason to live: when every other slot is parked the master gives up even if the
    auxiliary ones still run (a host whose consumers all crash is down, whatever its helpers do).
    """

    name: str
    size: int
    scalable: bool = field(default=False, kw_only=True)
    numbered: bool = field(default=True, kw_only=True)
    auxiliary: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise PlanError(f"group name must be a non-empty string, not {self.name!r}")
        if "#" in self.name:
            # '#' separates the group from the slot number; allowing it would let "a#1" (unnumbered)
            # collide with slot 1 of group "a".
            raise PlanError(f"group name {self.name!r} must not contain '#'")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise PlanError(f"group {self.name!r}: size must be an int >= 0, not {self.size!r}")
        if not self.numbered and self.size != 1:
            raise PlanError(f"group {self.name!r}: an unnumbered group has exactly one slot, not {self.size}")
        if not self.numbered and self.scalable:
            raise PlanError(f"group {self.name!r}: an unnumbered group cannot be scalable")

    def slot_names(self) -> list[str]:
        if not self.numbered:
            return [self.name]
        return [f"{self.name}#{i}" for i in range(1, self.size + 1)]


@dataclass(frozen=True)
class SlotGroup(GroupShape):
    """A group as the caller's build makes it: its shape and the `target` each of its children runs
    (called with the child's ChildContext; its return value is the child's exit code)."""

    target: Callable[["ChildContext"], int | None]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.target):
            raise PlanError(f"group {self.name!r}: target must be callable, not {self.target!r}")


class Slot(NamedTuple):
    name: str
    group: GroupShape
    index: int  # 1-based; 1 for an unnumbered group


@dataclass(frozen=True)
class Plan:
    groups: tuple[GroupShape, ...]  # SlotGroups in the image, GroupShapes in the master

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        for group in groups:
            if not isinstance(group, GroupShape):
                raise PlanError(f"a plan holds SlotGroup objects, not {group!r}")
        names = [group.name for group in groups]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise PlanError(f"duplicate group names: {', '.join(duplicates)}")
        object.__setattr__(self, "groups", groups)

    def slots(self) -> list[Slot]:
        """Every slot in order: groups as given, slots by number."""
        return [
            Slot(name, group, index)
            for group in self.groups
            for index, name in enumerate(group.slot_names(), start=1)
        ]

    def describe(self) -> str:
        return ", ".join(f"{group.name} x{group.size}" for group in self.groups) or "no groups"

    def scaled(self, delta: int) -> "Plan":
        """This plan with every scalable group grown or shrunk by `delta`, never below one slot.

        Shrinking drops the highest-numbered slots, because slot names are numbered from 1.
        """
        groups = []
        for group in self.groups:
            if group.scalable:
                size = group.size + delta
                if delta < 0:
                    size = max(size, min(group.size, 1))
                group = dataclasses.replace(group, size=size)
            groups.append(group)
        return Plan(tuple(groups))

    def shape(self) -> list[dict]:
        """The plan without its targets, as JSON-able data: what the image tells the master."""
        return [dict(name=g.name, size=g.size, scalable=g.scalable, numbered=g.numbered, auxiliary=g.auxiliary)
                for g in self.groups]

    @classmethod
    def from_shape(cls, groups: Iterable[dict]) -> Plan:
        """The master's copy of the image's plan: the same slots, no targets (those live in the image).
        Raises (PlanError, KeyError, TypeError) on a shape that is no plan."""
        return cls(tuple(GroupShape(g["name"], g["size"], scalable=g["scalable"], numbered=g["numbered"],
                                    auxiliary=bool(g.get("auxiliary", False)))
                         for g in groups))

