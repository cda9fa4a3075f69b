"""Residency policy, slot planning and signatures (no engine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coe.cache.plan import plan_groups, planned_residency
from coe.cache.residency import ResidencyManager
from coe.cache.signature import SignatureError, architecture_signature
from coe.cache.tiers import ExpertResidency, Tier
from coe.config import ConfigError, parse_config

GIB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manager(budget: int, clock: Clock, **bytes_by_name: int) -> ResidencyManager:
    records = [ExpertResidency(n, f"/m/{n}", b) for n, b in bytes_by_name.items()]
    return ResidencyManager(records, budget, half_life_s=60.0, clock=clock)


def put_in_host(m: ResidencyManager, name: str, nbytes: int) -> None:
    r = m[name]
    r.host_slot, r.host_layout, r.host_bytes = 0, "engine", nbytes


def test_rate_decays_with_the_half_life_and_tracks_a_steady_stream() -> None:
    clock = Clock()
    r = ExpertResidency("a", "/m/a", 10)
    for _ in range(600):  # one request a second for ten minutes
        r.note_request(clock(), 60.0)
        clock.now += 1.0
    assert r.rate(clock(), 60.0) == pytest.approx(1.0, rel=0.05)
    clock.now += 60.0
    assert r.rate(clock(), 60.0) == pytest.approx(0.5, rel=0.05)


def test_eviction_takes_the_lowest_expected_cost_first() -> None:
    clock = Clock()
    m = manager(3 * GIB, clock, hot=GIB, cold=GIB, big=2 * GIB, new=GIB)
    for name in ("hot", "cold"):
        put_in_host(m, name, GIB)
    for _ in range(10):
        m.note_request("hot")
    m.note_request("cold")
    assert m.host_used() == 2 * GIB
    assert m.host_victims(GIB) == []  # fits without evicting
    assert m.host_victims(2 * GIB) == ["cold"]
    assert m.host_victims(3 * GIB) == ["cold", "hot"]
    assert m.host_victims(4 * GIB) is None  # bigger than the whole budget
    # Prefetch may only evict what is worth less than what it brings in.
    assert m.host_victims(2 * GIB, below=m.expected_cost("cold") / 2) is None


def test_size_counts_a_big_rarely_used_expert_costs_more_to_lose() -> None:
    clock = Clock()
    m = manager(10 * GIB, clock, small=GIB, big=8 * GIB)
    put_in_host(m, "small", GIB)
    put_in_host(m, "big", 8 * GIB)
    for _ in range(3):
        m.note_request("small")
    m.note_request("big")
    # 3 requests of a 1 GiB expert vs 1 request of an 8 GiB one: losing the big one costs more.
    assert m.expected_cost("big") > m.expected_cost("small")
    assert m.host_victims(2 * GIB) == ["small"]


def test_resident_and_loading_experts_are_never_evicted() -> None:
    clock = Clock()
    m = manager(2 * GIB, clock, a=GIB, b=GIB, c=GIB)
    put_in_host(m, "a", GIB)
    put_in_host(m, "b", GIB)
    m["a"].resident_slot = 0
    m["b"].loading = True
    assert m["a"].tier is Tier.HBM and m["b"].tier is Tier.DISK
    assert m.host_victims(GIB) is None


def test_switch_estimates_follow_the_tier() -> None:
    clock = Clock()
    m = manager(4 * GIB, clock, a=GIB)
    disk = m.switch_seconds("a")
    put_in_host(m, "a", GIB)
    assert m.switch_seconds("a") < disk
    m["a"].resident_slot = 0
    assert m.switch_seconds("a") == 0.0


def fake_checkpoint(folder: Path, hidden: int = 8, scale: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "toy", "hidden_size": hidden, "_name_or_path": str(folder)})
    )
    save_file({"w": torch.ones(hidden, hidden) * scale}, str(folder / "model.safetensors"))
    return folder


def test_signature_is_shared_by_same_shapes_and_differs_otherwise(tmp_path: Path) -> None:
    a = architecture_signature(fake_checkpoint(tmp_path / "a"), "bfloat16")
    b = architecture_signature(fake_checkpoint(tmp_path / "b", scale=2.0), "bfloat16")
    c = architecture_signature(fake_checkpoint(tmp_path / "c", hidden=16), "bfloat16")
    assert a == b and a != c
    assert a != architecture_signature(tmp_path / "a", "float16")
    with pytest.raises(SignatureError, match=r"config\.json"):
        architecture_signature(tmp_path / "missing", "bfloat16")
    (tmp_path / "d").mkdir()
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(SignatureError, match="too short"):
        architecture_signature(tmp_path / "d", "bfloat16")


def pool_of(tmp_path: Path, cache: dict[str, int] | None, n: int = 3) -> dict:
    experts = []
    for i in range(n):
        path = fake_checkpoint(tmp_path / f"m{i}", scale=float(i + 1))
        experts.append({"name": f"e{i}", "model": str(path), "vllm": {"cpu_kv_cache_gib": 1}})
    experts.append(
        {"name": "again", "model": str(tmp_path / "m0"), "vllm": {"cpu_kv_cache_gib": 1}}
    )
    return {
        "experts": experts,
        "categories": [{"name": "general", "expert": "e0"}],
        **({"cache": cache} if cache else {}),
    }


def test_plan_groups_checkpoints_and_deals_slots_from_the_budget(tmp_path: Path) -> None:
    cfg = parse_config(pool_of(tmp_path, None), tmp_path / "experts.yaml")
    (plan,) = plan_groups(cfg)
    assert [u.name for u in plan.units] == ["e0", "e1", "e2"]
    assert plan.units[0].experts == ("e0", "again")  # same checkpoint, same unit
    assert plan.slots == 3 and not plan.swaps  # no budget: everything resident
    cfg = parse_config(pool_of(tmp_path, {"hbm_bytes": 2 * GIB + 4096}), tmp_path / "experts.yaml")
    (plan,) = plan_groups(cfg)
    assert plan.slots == 2 and plan.swaps
    placement = planned_residency(cfg)
    assert [placement[e]["tier"] for e in ("e0", "again", "e1", "e2")] == [
        "hbm",
        "hbm",
        "hbm",
        "disk",
    ]


def test_a_budget_too_small_for_one_slot_names_the_key_and_the_fix(tmp_path: Path) -> None:
    cfg = parse_config(pool_of(tmp_path, {"hbm_bytes": GIB}), tmp_path / "experts.yaml")
    with pytest.raises(ConfigError) as err:
        plan_groups(cfg)
    message = str(err.value)
    assert "cache.hbm_bytes" in message and "Raise cache.hbm_bytes" in message
    assert "e0, e1, e2, again" in message


def test_on_cuda_a_lone_architecture_sleeps_instead_of_holding_a_slot(tmp_path: Path) -> None:
    data = pool_of(tmp_path, {"hbm_bytes": 3 * GIB + 4096})
    lone = fake_checkpoint(tmp_path / "lone", hidden=16)
    data["experts"].append({"name": "lone", "model": str(lone), "vllm": {"cpu_kv_cache_gib": 1}})
    cfg = parse_config(data, tmp_path / "experts.yaml")
    shared, solo = plan_groups(cfg, cuda=True)
    assert solo.sleeps and solo.experts == ["lone"]
    assert not shared.sleeps and shared.slots == 2  # 3 GiB less the sleeper's 1 GiB reservation
    cpu_shared, cpu_solo = plan_groups(cfg, cuda=False)
    assert not cpu_solo.sleeps and not cpu_shared.sleeps  # the CPU build cannot sleep
