"""``Gates``: what a test waits for before its tokens besides the concurrency cap: the
machine's free memory and load (``MachineGate``) and the resources it declares
(``ResourcePool``). The scheduler takes them as one ``SlotPool``, where the cap's slot is
taken (after a batch is released, before the tokens: a start held back after taking its
tokens would bunch up with later ones past the rate)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..limits.clock import MONOTONIC, Clock
from ..stores.base import Slot

if TYPE_CHECKING:
    from ..stores.base import ResourcePool, SlotPool
    from .machine import MachineGate

__all__ = ["FREE_MEMORY", "LOAD", "RESOURCES", "GateSlot", "Gates"]

#: The names the waits are reported under (``waited_by_limit``, a test's ``limit``).
FREE_MEMORY = "free memory"
LOAD = "load average"
RESOURCES = "resources"
_MACHINE_NAMES = {"memory": FREE_MEMORY, "load": LOAD}


class GateSlot(Slot):
    """What a test holds from the gates: the cap's slot and its resources."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[tuple[SlotPool | ResourcePool, Slot]]) -> None:
        super().__init__(-1)
        self.parts = parts


class Gates:
    """The concurrency cap, the declared resources and the machine's gates, as one pool.

    ``request`` is the next test's amounts and priority, set before its admission (one test
    is admitted at a time in a process). ``waits`` says, after each ``acquire``, how long
    each gate held the test (ns, by name); ``blocked`` why it gave up (at the deadline).
    """

    def __init__(
        self,
        slots: SlotPool | None,
        resources: ResourcePool | None,
        machine: MachineGate | None,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.slots = slots
        self.resources = resources
        self.machine = machine
        self.capacity = slots.capacity if slots is not None else 0
        self._clock = clock
        self.request: tuple[Mapping[str, float], int] = ({}, 0)
        self.waits: dict[str, int] = {}
        self.blocked = ""
        #: Sleeps of the machine gate's polls; the scheduler's own, which a stop interrupts.
        self.sleep: Callable[[float], None] = clock.sleep

    def acquire(self, max_wait_ns: int | None = None) -> Slot | None:
        clock = self._clock
        began = clock.now_ns()
        deadline = None if max_wait_ns is None else began + max_wait_ns
        self.waits = {}
        self.blocked = ""
        held: list[tuple[SlotPool | ResourcePool, Slot]] = []
        try:
            if self.machine is not None:
                waited, reason = self.machine.wait(deadline, self.sleep)
                name = _MACHINE_NAMES.get(self.machine.last_bound, FREE_MEMORY)
                if waited:
                    self.waits[name] = waited
                if reason:
                    self.blocked = reason
                    return None
            amounts, priority = self.request
            resources = self.resources
            if resources is not None and amounts:
                slot = self._take(
                    RESOURCES, deadline, lambda left: resources.acquire(amounts, left, priority)
                )
                if slot is None:
                    self.blocked = f"waited for resources ({_amounts(amounts)})"
                    return None
                held.append((resources, slot))
            if self.slots is not None:
                slot = self._take("concurrency", deadline, self.slots.acquire)
                if slot is None:
                    return self._give_back(held)
                held.append((self.slots, slot))
        except BaseException:
            self._give_back(held)
            raise
        return GateSlot(held)

    def _take(
        self, name: str, deadline: int | None, acquire: Callable[[int | None], Slot | None]
    ) -> Slot | None:
        before = self._clock.now_ns()
        slot = acquire(None if deadline is None else max(0, deadline - before))
        waited = self._clock.now_ns() - before
        if waited:
            self.waits[name] = waited
        return slot

    @staticmethod
    def _give_back(held: list[tuple[SlotPool | ResourcePool, Slot]]) -> None:
        for pool, slot in reversed(held):
            pool.release(slot)

    def release(self, slot: Slot) -> None:
        if not slot.live:
            return
        slot.live = False
        assert isinstance(slot, GateSlot)
        self._give_back(slot.parts)

    def describe(self) -> str:
        parts = [part.describe() for part in (self.slots, self.resources) if part is not None]
        if self.machine is not None:
            parts.append(self.machine.describe())
        return "; ".join(parts)

    def close(self) -> None:
        for part in (self.slots, self.resources):
            if part is not None:
                part.close()


def _amounts(amounts: Mapping[str, float]) -> str:
    from ..limits.resources import describe_amounts

    return describe_amounts(amounts)
