"""The CUDA path for experts whose architecture no other expert shares.

Such an expert cannot swap into another expert's slot, so it keeps an engine of its own and,
when HBM is needed for another engine, sleeps (vLLM sleep mode, ``enable_sleep_mode``):

- level 1 moves its weights to host RAM and frees its KV cache; waking copies them back;
- level 2 drops its weights; waking reloads them from the checkpoint.

``SleepPlanner`` decides (pure bookkeeping, unit-tested on any machine); ``SleepCoordinator``
performs it on real engines. The CPU build ignores sleep mode, so the coordinator is only used
when CUDA is present.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coe.cache.rpc import WorkerClient
from coe.cache.tiers import ExpertResidency
from coe.engines.base import EngineHealth, engine_health


@dataclass
class SoloEngine:
    name: str
    weight_bytes: int
    kv_bytes: int
    awake: bool = False
    level: int = 0  # sleep level while asleep; 0 = never started or awake
    in_flight: int = 0

    @property
    def hbm_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


class SleepPlanner:
    def __init__(
        self,
        engines: list[SoloEngine],
        hbm_budget: int,
        host_budget: int,
        half_life_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engines = {e.name: e for e in engines}
        self.hbm_budget = hbm_budget
        self.host_budget = host_budget
        self.half_life_s = half_life_s
        self.clock = clock
        self._use = {e.name: ExpertResidency(e.name, "", e.weight_bytes) for e in engines}
        for e in engines:
            if e.hbm_bytes > hbm_budget:
                raise ValueError(
                    f"expert {e.name} needs {e.hbm_bytes:,} bytes of HBM awake; the budget is "
                    f"{hbm_budget:,} (cache.hbm_bytes)"
                )

    def note_request(self, name: str) -> None:
        self._use[name].note_request(self.clock(), self.half_life_s)

    def hbm_used(self) -> int:
        return sum(e.hbm_bytes for e in self.engines.values() if e.awake)

    def host_used(self) -> int:
        return sum(e.weight_bytes for e in self.engines.values() if not e.awake and e.level == 1)

    def value(self, name: str) -> float:
        """Expected seconds lost per second if this engine sleeps: its request rate times its
        wake cost (weights back from host RAM, at worst from disk: bytes as the proxy)."""
        return (
            self._use[name].rate(self.clock(), self.half_life_s) * self.engines[name].weight_bytes
        )

    def plan_wake(self, name: str) -> list[tuple[str, int]] | None:
        """Engines to put to sleep (with their level) so that `name` can be awake; [] if it
        already fits, None if only busy engines could make room (the caller waits)."""
        target = self.engines[name]
        if target.awake:
            return []
        free = self.hbm_budget - self.hbm_used()
        idle = [
            e for e in self.engines.values() if e.awake and e.in_flight == 0 and e is not target
        ]
        idle.sort(key=lambda e: self.value(e.name))
        plan: list[tuple[str, int]] = []
        host_free = self.host_budget - self.host_used()
        for engine in idle:
            if free >= target.hbm_bytes:
                break
            level = 1 if engine.weight_bytes <= host_free else 2
            if level == 1:
                host_free -= engine.weight_bytes
            plan.append((engine.name, level))
            free += engine.hbm_bytes
        return plan if free >= target.hbm_bytes else None

    def applied(self, plan: list[tuple[str, int]], woken: str | None) -> None:
        for name, level in plan:
            self.engines[name].awake, self.engines[name].level = False, level
        if woken is not None:
            self.engines[woken].awake, self.engines[woken].level = True, 0


class SleepCoordinator:
    """Wakes a solo engine on demand, first putting the least valuable idle ones to sleep."""

    def __init__(self, planner: SleepPlanner, engines: dict[str, Any], paths: dict[str, str]):
        self.planner = planner
        self.engines = engines  # name -> VllmLocalEngine (started with enable_sleep_mode)
        self.paths = paths
        self._changed = asyncio.Condition()

    async def acquire(self, name: str) -> Any:
        self.planner.note_request(name)
        async with self._changed:
            while True:
                plan = self.planner.plan_wake(name)
                if plan is not None:
                    break
                await self._changed.wait()  # every candidate is busy: wait for a release
            await self._apply(plan, name)
            self.planner.engines[name].in_flight += 1
        return self.engines[name]

    async def release(self, name: str) -> None:
        async with self._changed:
            self.planner.engines[name].in_flight -= 1
            self._changed.notify_all()

    async def _apply(self, plan: list[tuple[str, int]], name: str) -> None:
        # State follows each step as it happens: a caller cancelled half-way must not leave the
        # planner believing a sleeping engine is awake.
        for victim, level in plan:
            await self.engines[victim].sleep(level)
            self.planner.applied([(victim, level)], None)
        engine = self.engines[name]
        state = self.planner.engines[name]
        if not engine.ready:
            await engine.start()
        elif not state.awake:
            await engine.wake_up()
            if state.level == 2:  # its weights were dropped: read them again
                await WorkerClient(engine).load_path(self.paths[name])
        self.planner.applied([], name)


class SleepingExpertEngine:
    """An expert on a solo engine that the coordinator may put to sleep (the Engine protocol)."""

    def __init__(self, name: str, unit: str, coordinator: SleepCoordinator):
        self.name = name
        self.unit = unit
        self.coordinator = coordinator

    @property
    def ready(self) -> bool:
        return bool(self.coordinator.engines[self.unit].ready)

    @property
    def crashed(self) -> bool:
        """Its engine process died, asleep or awake (the supervisor's question)."""
        return bool(getattr(self.coordinator.engines[self.unit], "crashed", False))

    async def health(self) -> EngineHealth:
        # By the process: an engine asleep is alive, and wakes for the next request.
        return await engine_health(self.coordinator.engines[self.unit])

    async def start(self) -> None:
        await self.coordinator.acquire(self.unit)  # starts (or wakes) the engine
        await self.coordinator.release(self.unit)

    async def restart(self) -> None:
        """Through the coordinator, like a start: the fresh engine comes up awake, so room is
        made first, and the planner then knows it is awake."""
        if self.crashed:
            await self.start()

    async def stream(self, prompt: Any, sampling: Any, request_id: str | None = None) -> Any:
        engine = await self.coordinator.acquire(self.unit)
        try:
            async for chunk in engine.stream(prompt, sampling, request_id):
                yield chunk
        finally:
            await self.coordinator.release(self.unit)

    async def shutdown(self) -> None:
        await asyncio.gather(*(e.shutdown() for e in self.coordinator.engines.values()))
