"""SlotGroup bookkeeping with several slots, against scripted engines whose workers behave like
coe.cache.worker.SlotWorker (fast; the real engine is in test_cache_engine.py).

Each fake engine answers with the name of the weights it holds, so a request served by the
wrong expert shows up in the text."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coe.cache.group import SlotGroup, Unit, new_record
from coe.cache.pool import CacheFactoryError, EnginePool
from coe.cache.residency import ResidencyManager
from coe.cache.slot import WORKER_EXTENSION, Slot
from coe.config import parse_config
from coe.engines.base import EngineError
from coe.engines.vllm_local import VllmOptions, VllmSpec
from coe.types import Chunk, Message, Prompt, SamplingParams, Usage, collect

from .test_cache_policy import GIB, pool_of

MB = 1 << 20
DISK = 100 * MB
ENGINE_LAYOUT = 200 * MB


@dataclass
class FakeSpec:
    options: VllmOptions


class FakeEngine:
    """A slot engine: its worker's host tier is `held`; `weights` is what it serves."""

    def __init__(self, boot: str, broken: set[str]):
        self.spec = FakeSpec(VllmOptions(max_num_seqs=4))
        self.boot, self.broken = boot, broken
        self.weights: str | None = None
        self.held: dict[str, str] = {}  # unit -> "checkpoint" | "engine"
        self.ready, self.starts, self.running = False, 0, 0
        self.switched_while_running = 0

    async def start(self) -> None:
        self.ready, self.starts, self.weights, self.held = True, self.starts + 1, self.boot, {}

    async def shutdown(self) -> None:
        self.ready = False

    async def reset_prefix_cache(self) -> None:
        pass

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        self.running += 1
        try:
            await asyncio.sleep(random.uniform(0.001, 0.01))
            yield Chunk(text=str(self.weights), finish_reason="stop", usage=Usage(1, 1))
        finally:
            self.running -= 1

    async def rpc(self, method: str, *args: Any) -> Any:
        await asyncio.sleep(0.001)
        if method == "coe_engine_bytes":
            return ENGINE_LAYOUT
        if method == "coe_capture":
            self.held[args[0]] = "engine"
            return {"bytes": ENGINE_LAYOUT}
        if method == "coe_drop":
            self.held.pop(args[0], None)
            return 0
        if method == "coe_stage":
            self.held[args[0]] = "loading"
            return None
        if method == "coe_wait_staged":
            unit = args[0]
            if unit in self.broken:
                self.held.pop(unit, None)
                return {"state": "failed", "error": "FileNotFoundError: gone"}
            self.held[unit] = "checkpoint"
            return {"state": "staged", "bytes": DISK, "seconds": 0.01}
        if self.running:
            self.switched_while_running += 1
        if method == "coe_activate":
            assert args[0] in self.held, f"{args[0]} is not in this worker's host tier"
            self.weights = args[0]
            return {"layout": self.held[args[0]], "seconds": 0.001}
        if method == "coe_load_path":
            self.weights = args[0].rsplit("/", 1)[-1]
            return {"layout": "checkpoint", "seconds": 0.01}
        raise AssertionError(method)


def make_group(slots: int, units: list[str], host_budget: int, broken: set[str]) -> SlotGroup:
    unit_list = [Unit(u, f"/models/{u}", (u,)) for u in units]
    residency = ResidencyManager([new_record(u, DISK) for u in unit_list], host_budget)
    engines = [FakeEngine(units[i], broken) for i in range(slots)]
    slot_list = [Slot(i, e, units[i]) for i, e in enumerate(engines)]  # type: ignore[arg-type]
    group = SlotGroup("toy", unit_list, slot_list, residency, max_wait_s=0.05)
    for u in units:
        residency.owners[u] = group
    return group


def check_books(group: SlotGroup) -> None:
    """The records agree with what the workers hold, and the budget holds."""
    residency = group.residency
    assert residency.host_used() <= residency.host_budget
    for slot in group.slots:
        engine: FakeEngine = slot.engine  # type: ignore[assignment]
        recorded = {
            r.name
            for r in residency.records.values()
            if r.host_slot == slot.index and not r.loading
        }
        held = {u for u, state in engine.held.items() if state != "loading"}
        assert recorded == held, f"slot {slot.index}: records {recorded}, worker {held}"


def test_many_concurrent_requests_over_two_slots_keep_the_books_straight() -> None:
    units = ["a", "b", "c", "d", "e"]

    async def run() -> SlotGroup:
        random.seed(7)
        group = make_group(2, units, host_budget=3 * ENGINE_LAYOUT, broken=set())
        await group.start()

        async def one(unit: str) -> None:
            prompt = Prompt((Message("user", "hi"),))
            done = await collect(group.stream(unit, prompt, SamplingParams(max_tokens=4), None))
            assert done.text == unit, f"{unit}'s request was answered by {done.text}"

        for _ in range(5):
            await asyncio.gather(*(one(random.choice(units)) for _ in range(40)))
            check_books(group)
        await group.shutdown()
        return group

    group = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert all(s.engine.switched_while_running == 0 for s in group.slots)  # type: ignore[attr-defined]
    residents = [r.resident_slot for r in group.residency.records.values()]
    assert sorted(x for x in residents if x is not None) == [0, 1]  # one checkpoint per slot


def test_a_broken_checkpoint_fails_alone_with_two_slots() -> None:
    async def run() -> list[object]:
        group = make_group(2, ["a", "b", "bad"], host_budget=4 * ENGINE_LAYOUT, broken={"bad"})
        await group.start()
        prompt = Prompt((Message("user", "hi"),))

        async def one(unit: str) -> str:
            done = await collect(group.stream(unit, prompt, SamplingParams(max_tokens=4), None))
            return done.text

        results = await asyncio.gather(
            *(one(u) for u in ["a", "bad", "b", "bad", "a", "b"]), return_exceptions=True
        )
        check_books(group)
        await group.shutdown()
        return results

    results = asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert [results[i] for i in (0, 2, 4, 5)] == ["a", "b", "a", "b"]
    for failed in (results[1], results[3]):
        assert isinstance(failed, EngineError)
        assert "could not be loaded from /models/bad" in str(failed)


def test_the_pool_plans_the_cache_whatever_engines_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected engines never switch the cache off: the pool refuses plain engines alone for
    a pool that swaps, and builds its slots with an injected slot factory."""
    monkeypatch.setenv("COE_HOME", str(tmp_path / "home"))  # the live status file
    cfg = parse_config(pool_of(tmp_path, {"hbm_bytes": 2 * GIB + 4096}), tmp_path / "experts.yaml")
    unit_at = {str(tmp_path / f"m{i}"): f"e{i}" for i in range(3)}

    def plain(_config: object, _expert: object, name: str) -> Any:
        return FakeEngine(name, set())

    with pytest.raises(CacheFactoryError, match="slot_factory"):
        EnginePool(cfg, plain)
    built: list[tuple[str, VllmSpec, bool]] = []

    def slots(name: str, spec: VllmSpec, autostart: bool) -> Any:
        built.append((name, spec, autostart))
        return FakeEngine(unit_at[spec.model], set())

    pool = EnginePool(cfg, plain, slot_factory=slots)
    assert len(pool.groups) == 1 and not pool.engines
    assert [spec.model for _, spec, _ in built] == [str(tmp_path / "m0"), str(tmp_path / "m1")]
    assert all(s.worker_extension == WORKER_EXTENSION and not auto for _, s, auto in built)

    async def ask(expert: str) -> str:
        prompt = Prompt((Message("user", "hi"),))
        stream = pool.engine_for(expert).stream(prompt, SamplingParams(max_tokens=4))
        return (await collect(stream)).text

    async def run() -> list[str]:
        try:
            return [await ask(e) for e in ("again", "e2", "e1")]
        finally:
            await pool.shutdown()

    assert asyncio.run(asyncio.wait_for(run(), timeout=60)) == ["e0", "e2", "e1"]
