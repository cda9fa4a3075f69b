"""The engine supervisor and per-expert health, with scripted engines (fast). The real engine
killed and brought back is in test_engine_vllm.py (in-process) and test_engine_remote.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from coe.cache.pool import EnginePool
from coe.cache.supervisor import Supervisor, backoff_delay
from coe.config import parse_config
from coe.engines.base import UP, EngineError, EngineHealth
from coe.engines.vllm_local import VllmSpec
from coe.types import Message, Prompt, SamplingParams, collect

from .test_cache_group import FakeEngine, make_group
from .test_cache_policy import GIB, pool_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Crashy:
    """A supervised member: ``crash()`` kills it; its next ``fail`` restarts raise."""

    def __init__(self, name: str = "crashy", fail: int = 0, restart_s: float = 0.0):
        self.name = name
        self.fail = fail
        self.restart_s = restart_s
        self.alive = True
        self.stopping = False
        self.tries: list[float] = []
        self.clock: Clock | None = None

    def crash(self) -> None:
        self.alive = False

    @property
    def crashed(self) -> bool:
        return not self.alive and not self.stopping

    async def restart(self) -> None:
        self.tries.append(self.clock.now if self.clock else 0.0)
        await asyncio.sleep(self.restart_s)
        if self.fail:
            self.fail -= 1
            raise EngineError("engine crashy failed to start")
        self.alive = True


def test_backoff_doubles_from_one_second_to_thirty() -> None:
    delays = [backoff_delay(n, 1.0, 30.0) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_failed_restarts_back_off_and_a_success_resets_the_delay() -> None:
    async def run() -> list[float]:
        clock = Clock()
        member = Crashy(fail=3)
        member.clock = clock
        supervisor = Supervisor([member], clock=clock)
        member.crash()
        # Poll every 0.25 s of the fake clock for 10 s: tries at 0, then 1, 2 and 4 s later.
        for step in range(41):
            clock.now = step * 0.25
            await supervisor.check()
        assert member.alive and supervisor.watches[0].restarts == 1
        assert supervisor.watches[0].failures == 0
        # A later crash is restarted at once, not after the last delay.
        member.crash()
        await supervisor.check()
        assert member.alive and member.tries[-1] == clock.now
        return member.tries

    assert asyncio.run(run())[:4] == [0.0, 1.0, 3.0, 7.0]


def test_a_member_that_is_not_crashed_or_is_stopping_is_left_alone() -> None:
    async def run() -> Crashy:
        member = Crashy()
        supervisor = Supervisor([member])
        await supervisor.check()
        member.crash()
        member.stopping = True
        await supervisor.check()
        return member

    assert asyncio.run(run()).tries == []


def test_the_running_supervisor_restarts_without_being_asked_and_stops_cleanly() -> None:
    async def run() -> None:
        member = Crashy(restart_s=0.3)
        supervisor = Supervisor([member], interval_s=0.02)
        supervisor.start()
        member.crash()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if member.tries:
                break
        assert member.tries, "the supervisor did not restart the crashed member"
        # Stopping during a restart waits for it: no engine is left half-created.
        await supervisor.stop()
        assert member.alive and not supervisor.running
        member.crash()
        await asyncio.sleep(0.1)
        assert len(member.tries) == 1, "restarted after stop()"

    asyncio.run(asyncio.wait_for(run(), timeout=10))


# -- slot groups ----------------------------------------------------------------------------


def test_a_slot_whose_engine_died_is_down_then_rebooted_with_its_boot_weights() -> None:
    async def run() -> None:
        group = make_group(1, ["a", "b"], host_budget=0, broken=set())
        assert (await group.health()).reason == "not started"
        await group.start()
        prompt = Prompt((Message("user", "hi"),))
        assert (await collect(group.stream("b", prompt, SamplingParams(), None))).text == "b"
        assert await group.health() == UP and not group.crashed
        engine: FakeEngine = group.slots[0].engine  # type: ignore[assignment]
        engine.ready = False  # its process died
        health = await group.health()
        assert health.state == "down" and group.crashed
        supervisor = Supervisor([group])
        await supervisor.check()
        assert engine.starts == 2 and await group.health() == UP and not group.crashed
        assert group.slots[0].resident == "a"  # the boot weights, not the swapped-in ones
        assert (await collect(group.stream("b", prompt, SamplingParams(), None))).text == "b"
        await group.shutdown()
        engine.ready = False
        assert not group.crashed, "a group being shut down is not restarted"

    asyncio.run(asyncio.wait_for(run(), timeout=30))


def test_one_dead_slot_of_two_leaves_the_group_up_and_says_so() -> None:
    async def run() -> EngineHealth:
        group = make_group(2, ["a", "b", "c"], host_budget=0, broken=set())
        await group.start()
        group.slots[1].engine.ready = False  # type: ignore[attr-defined]
        health = await group.health()
        await group.shutdown()
        return health

    assert asyncio.run(run()) == EngineHealth("up", "1 of 2 slots restarting")


# -- the pool ---------------------------------------------------------------------------------


class Reporting(FakeEngine):
    """A plain engine that reports a scripted health and counts the questions."""

    def __init__(self, name: str):
        super().__init__(name, set())
        self.name = name
        self.state = EngineHealth("up")
        self.asked = 0

    async def health(self) -> EngineHealth:
        self.asked += 1
        return self.state


def test_the_pool_reports_each_expert_asking_each_engine_once_and_supervises_its_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COE_HOME", str(tmp_path / "home"))
    # Three checkpoints, two slots: a weight-cache group (see test_cache_group); and two
    # experts on one remote server, which share one engine.
    data = pool_of(tmp_path, {"hbm_bytes": 2 * GIB + 4096})
    remote = {"engine": "remote", "remote": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    data["experts"] += [{"name": "far", **remote}, {"name": "farther", **remote}]
    cfg = parse_config(data, tmp_path / "experts.yaml")
    unit_at = {str(tmp_path / f"m{i}"): f"e{i}" for i in range(3)}

    def slots(name: str, spec: VllmSpec, autostart: bool) -> Any:
        return FakeEngine(unit_at[spec.model], set())

    pool = EnginePool(cfg, lambda c, e, n: Reporting(n), slot_factory=slots)
    group = next(iter(pool.groups.values()))
    far = pool.engine_for("far")
    assert isinstance(far, Reporting) and pool.engine_for("farther") is far
    # The group is supervised; the remote engine is not (its server is someone else's).
    assert [w.member for w in pool.supervisor.watches] == [group]

    async def run() -> None:
        before = await pool.health()
        assert before["e0"].reason == "not started" and before["far"] == UP
        await pool.start()
        assert pool.supervisor.running
        far.state = EngineHealth("down", "unreachable (ConnectError)")
        far.asked = 0
        health = await pool.health()
        assert far.asked == 1
        assert health["far"] == health["farther"] == far.state
        assert {health[e] for e in ("e0", "e1", "e2", "again")} == {UP}
        for slot in group.slots:
            slot.engine.ready = False  # type: ignore[attr-defined]
        assert (await pool.health())["e1"].state == "down"
        for _ in range(200):  # the supervisor reboots both slots, no request needed
            await asyncio.sleep(0.01)
            if (await pool.health())["e1"] == UP and not group.crashed:
                break
        assert all(s.engine.starts == 2 for s in group.slots)  # type: ignore[attr-defined]
        await pool.shutdown()
        assert not pool.supervisor.running

    asyncio.run(asyncio.wait_for(run(), timeout=30))
