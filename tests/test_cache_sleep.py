"""The CUDA sleep-mode path's decisions, with scripted engines (the CPU build cannot sleep)."""

from __future__ import annotations

import asyncio

from coe.cache.sleep import SleepCoordinator, SleepPlanner, SoloEngine

GIB = 1 << 30


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def planner(hbm: int, host: int) -> SleepPlanner:
    engines = [SoloEngine(n, 4 * GIB, GIB) for n in ("coder", "math", "writer")]
    return SleepPlanner(engines, hbm, host, clock=Clock())


def test_waking_an_engine_puts_the_least_valuable_idle_one_to_sleep() -> None:
    p = planner(hbm=10 * GIB, host=16 * GIB)
    assert p.plan_wake("coder") == []
    p.applied([], "coder")
    p.applied([], "math")
    for _ in range(5):
        p.note_request("coder")
    p.note_request("math")
    assert p.plan_wake("writer") == [("math", 1)]  # math is colder; host RAM has room: level 1


def test_level_two_when_host_ram_is_short_and_busy_engines_are_never_put_to_sleep() -> None:
    p = planner(hbm=10 * GIB, host=2 * GIB)
    p.applied([], "coder")
    p.applied([], "math")
    assert p.plan_wake("writer") in ([("coder", 2)], [("math", 2)])
    p.engines["coder"].in_flight = 1
    p.engines["math"].in_flight = 1
    assert p.plan_wake("writer") is None


class FakeEngine:
    def __init__(self, log: list[str], name: str):
        self.log, self.name, self.ready = log, name, False

    async def start(self) -> None:
        self.ready = True
        self.log.append(f"start {self.name}")

    async def sleep(self, level: int) -> None:
        self.log.append(f"sleep {self.name} {level}")

    async def wake_up(self) -> None:
        self.log.append(f"wake {self.name}")

    async def rpc(self, method: str, *args: object) -> None:
        self.log.append(f"{method} {self.name}")


def test_the_coordinator_waits_for_a_busy_engine_then_swaps() -> None:
    async def run() -> list[str]:
        log: list[str] = []
        p = planner(hbm=5 * GIB, host=0)  # room for one awake engine; level 2 only
        engines = {n: FakeEngine(log, n) for n in p.engines}
        coordinator = SleepCoordinator(p, engines, {n: f"/m/{n}" for n in p.engines})
        await coordinator.acquire("coder")
        waiting = asyncio.create_task(coordinator.acquire("math"))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # coder is busy: math waits
        await coordinator.release("coder")
        await waiting
        await coordinator.release("math")
        await coordinator.acquire("coder")  # asleep at level 2: wake and reload
        return log

    log = asyncio.run(run())
    assert log == [
        "start coder",
        "sleep coder 2",
        "start math",
        "sleep math 2",
        "wake coder",
        "coe_load_path coder",
    ]
