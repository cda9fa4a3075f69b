"""The scheduler's decisions, against scripted slots (fast; the real engine is in
test_cache_engine.py)."""

from __future__ import annotations

import asyncio

import pytest

from coe.cache.scheduler import Scheduler
from coe.engines.base import EngineError


class FakeSlot:
    def __init__(self, index: int, resident: str | None = None, capacity: int = 64):
        self.index = index
        self.in_flight = 0
        self.capacity = capacity
        self._resident = resident

    @property
    def resident(self) -> str | None:
        return self._resident


class FakeSwitcher:
    """Moves weights in `seconds`; records every switch and checks the slot was idle."""

    def __init__(self, seconds: float = 0.01, broken: frozenset[str] = frozenset()):
        self.seconds = seconds
        self.broken = broken
        self.switches: list[tuple[int, str]] = []
        self.violations = 0

    def switch_seconds(self, expert: str) -> float:
        return self.seconds

    def can_serve(self, expert: str, slot: int) -> bool:
        return True

    async def make_resident(self, slot: FakeSlot, expert: str) -> None:
        if slot.in_flight:
            self.violations += 1
        slot._resident = None
        await asyncio.sleep(self.seconds)
        if slot.in_flight:
            self.violations += 1
        if expert in self.broken:
            raise EngineError(f"expert weights {expert} could not be loaded: missing")
        self.switches.append((slot.index, expert))
        slot._resident = expert


async def serve(scheduler: Scheduler, expert: str, log: list[str], seconds: float = 0.02) -> str:
    slot = await scheduler.acquire(expert)
    try:
        assert slot.resident == expert, f"{expert} admitted while {slot.resident} is resident"
        await asyncio.sleep(seconds)
        log.append(expert)
        return expert
    finally:
        scheduler.release(slot)


def test_resident_requests_are_admitted_together_and_switches_are_grouped() -> None:
    async def run() -> tuple[FakeSwitcher, list[str], FakeSlot]:
        slot = FakeSlot(0, resident="a")
        switcher = FakeSwitcher()
        scheduler = Scheduler([slot], switcher, max_wait_s=10.0)
        log: list[str] = []
        order = ["a", "b", "a", "c", "b", "a", "c", "b"]
        results = await asyncio.gather(*(serve(scheduler, e, log) for e in order))
        assert results == order
        return switcher, log, slot

    switcher, log, slot = asyncio.run(run())
    assert switcher.violations == 0
    # Grouped, not served in arrival order: each expert is switched to at most once.
    switched = [e for _, e in switcher.switches]
    assert len(switched) == len(set(switched)) <= 3
    assert log[:2] == ["a", "a"]
    assert slot.in_flight == 0


def test_arrival_policy_switches_whenever_the_next_expert_differs() -> None:
    async def run() -> FakeSwitcher:
        slot = FakeSlot(0, resident="a")
        switcher = FakeSwitcher()
        scheduler = Scheduler([slot], switcher, policy="arrival")
        log: list[str] = []
        await asyncio.gather(*(serve(scheduler, e, log) for e in ["a", "b", "a", "b", "b", "a"]))
        assert log == ["a", "b", "a", "b", "b", "a"]
        return switcher

    switcher = asyncio.run(run())
    assert [e for _, e in switcher.switches] == ["b", "a", "b", "a"]
    assert switcher.violations == 0


def test_a_waiting_expert_gets_the_slot_within_the_bound() -> None:
    """A steady stream for the resident expert must not starve another expert's request."""

    async def run() -> float:
        slot = FakeSlot(0, resident="a")
        scheduler = Scheduler([slot], FakeSwitcher(), max_wait_s=0.2)
        log: list[str] = []
        stop = asyncio.Event()

        async def stream_of_a() -> None:
            while not stop.is_set():
                await asyncio.gather(*(serve(scheduler, "a", log, 0.05) for _ in range(2)))

        feeder = asyncio.create_task(stream_of_a())
        await asyncio.sleep(0.05)
        t0 = asyncio.get_running_loop().time()
        await serve(scheduler, "b", log)
        waited = asyncio.get_running_loop().time() - t0
        stop.set()
        await feeder
        return waited

    waited = asyncio.run(run())
    # The bound, plus the in-flight requests finishing, plus the switch.
    assert waited < 0.2 + 0.05 + 0.01 + 0.15


def test_a_failed_load_fails_that_experts_requests_and_the_slot_serves_others() -> None:
    async def run() -> tuple[list[object], FakeSwitcher]:
        slot = FakeSlot(0, resident="a")
        switcher = FakeSwitcher(broken=frozenset({"bad"}))
        scheduler = Scheduler([slot], switcher, max_wait_s=10.0)
        log: list[str] = []
        results = await asyncio.gather(
            *(serve(scheduler, e, log) for e in ["a", "bad", "bad", "b", "a"]),
            return_exceptions=True,
        )
        return results, switcher

    results, switcher = asyncio.run(run())
    assert results[0] == "a" and results[3] == "b" and results[4] == "a"
    assert ("bad" not in {e for _, e in switcher.switches}) and switcher.violations == 0
    for failed in results[1:3]:
        assert isinstance(failed, EngineError)
        assert "could not be loaded" in str(failed)


def test_two_slots_never_hold_the_same_expert_and_cancelled_waits_leave_no_trace() -> None:
    async def run() -> tuple[FakeSwitcher, list[FakeSlot], Scheduler]:
        slots = [FakeSlot(0, resident="a"), FakeSlot(1, resident="b")]
        switcher = FakeSwitcher()
        scheduler = Scheduler(slots, switcher, max_wait_s=10.0)
        log: list[str] = []
        waiter = asyncio.create_task(serve(scheduler, "c", log, 0.5))
        await asyncio.gather(*(serve(scheduler, e, log) for e in ["a", "b", "c", "d", "d"]))
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return switcher, slots, scheduler

    switcher, slots, scheduler = asyncio.run(run())
    assert switcher.violations == 0
    assert sum(1 for _, e in switcher.switches if e == "c") == 1
    assert all(s.in_flight == 0 for s in slots)
    assert scheduler.waiting("c") == 0


def test_overdue_experts_do_not_take_the_slot_from_each_other() -> None:
    """Switches slower than the bound: each switched-in expert still serves what it came for."""

    async def run() -> FakeSwitcher:
        slot = FakeSlot(0, resident="a")
        switcher = FakeSwitcher(seconds=0.05)
        scheduler = Scheduler([slot], switcher, max_wait_s=0.01)
        log: list[str] = []
        requests = [serve(scheduler, e, log) for e in ["b", "c", "b", "c", "a"]]
        await asyncio.wait_for(asyncio.gather(*requests), timeout=5)
        return switcher

    switcher = asyncio.run(run())
    assert len(switcher.switches) <= 3


def test_admission_stops_at_capacity_and_a_bigger_queue_takes_the_slot_next() -> None:
    """Requests beyond the batch capacity stay in coe's queue, where they count for the choice
    of the next expert, instead of waiting inside the engine."""

    async def run() -> tuple[list[str], FakeSwitcher]:
        slot = FakeSlot(0, resident="a", capacity=2)
        switcher = FakeSwitcher()
        scheduler = Scheduler([slot], switcher, max_wait_s=10.0)
        log: list[str] = []
        order = ["a", "a", "a"] + ["b"] * 4
        await asyncio.gather(*(serve(scheduler, e, log) for e in order))
        return log, switcher

    log, switcher = asyncio.run(run())
    # Two a's run; then b's four queued requests outweigh a's one and take the slot first.
    assert log == ["a", "a", "b", "b", "b", "b", "a"]
    assert [e for _, e in switcher.switches] == ["b", "a"]
