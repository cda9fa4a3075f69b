"""From experts.yaml to slot groups: which checkpoints share an engine, and how many slots.

Experts are grouped by architecture signature and engine settings. A group gets one slot per
checkpoint unless ``cache.hbm_bytes`` is set; then every group gets one slot and the rest of the
budget is dealt out a slot at a time. Groups with fewer slots than checkpoints swap weights; the
others keep one plain engine per checkpoint (everything resident).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from coe.cache.checkpoint import checkpoint_bytes
from coe.cache.group import SlotGroup, Unit, new_record, unit_signature
from coe.cache.residency import ResidencyManager
from coe.cache.sleep import SleepCoordinator, SleepingExpertEngine, SleepPlanner, SoloEngine
from coe.cache.slot import WORKER_EXTENSION, Slot, SlotEngineFactory, vllm_slot_engine
from coe.config import ConfigError, Expert, PoolConfig
from coe.engines.vllm_local import VllmSpec

GIB = 1 << 30


@dataclass
class GroupPlan:
    key: str
    template: Expert  # engine settings shared by the group
    units: list[Unit]
    unit_bytes: dict[str, int]
    slots: int = 0
    slot_bytes: int = 0
    experts: list[str] = field(default_factory=list)
    # CUDA only: a lone checkpoint with an engine of its own that sleeps when HBM is short.
    sleeps: bool = False

    @property
    def swaps(self) -> bool:
        return self.slots < len(self.units)


def default_host_budget() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.4)
    except (ValueError, OSError):
        return 8 * GIB


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def plan_groups(config: PoolConfig, cuda: bool | None = None) -> list[GroupPlan]:
    plans: dict[tuple[object, ...], GroupPlan] = {}
    for expert in config.experts:
        if expert.engine != "vllm" or expert.adapter is not None or expert.vllm.lora is not None:
            continue  # LoRA bases and their adapters: one plain engine, adapters per request
        path = config.resolve_model(expert)
        signature = unit_signature(path, expert.dtype)
        if signature is None:
            continue  # not a local safetensors checkpoint: served by a plain engine
        key = (signature, expert.dtype, expert.max_model_len, expert.vllm)
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = GroupPlan(signature, expert, [], {})
        plan.experts.append(expert.name)
        for i, unit in enumerate(plan.units):
            if unit.path == path:
                plan.units[i] = Unit(unit.name, unit.path, (*unit.experts, expert.name))
                break
        else:
            plan.units.append(Unit(expert.name, path, (expert.name,)))
            plan.unit_bytes[expert.name] = checkpoint_bytes(path)
    groups = list(plans.values())
    for plan in groups:
        kv = config.cache.kv_bytes_per_slot
        if kv is None:
            kv = plan.template.vllm.cpu_kv_cache_gib * GIB
        plan.slot_bytes = max(plan.unit_bytes.values()) + kv
    _deal_slots(config, groups, cuda)
    return groups


def _deal_slots(config: PoolConfig, groups: list[GroupPlan], cuda: bool | None) -> None:
    budget = config.cache.hbm_bytes
    if budget is None:
        for plan in groups:
            plan.slots = len(plan.units)
        return
    # With sleep mode, lone checkpoints share what the slot groups leave (at least the largest).
    sleepers: list[GroupPlan] = []
    if len(groups) > 1 and (cuda if cuda is not None else cuda_available()):  # imports torch
        sleepers = [p for p in groups if len(p.units) == 1]
    for plan in sleepers:
        plan.sleeps, plan.slots = True, 1
    groups = [p for p in groups if not p.sleeps]
    if sleepers:
        budget -= max(p.slot_bytes for p in sleepers)
    need = sum(p.slot_bytes for p in groups)
    if need > budget:
        names = "; ".join(f"{', '.join(p.experts)}: {p.slot_bytes:,} bytes" for p in groups)
        raise ConfigError(
            config.source or "experts.yaml",
            [
                f"cache.hbm_bytes: {budget:,} bytes cannot hold one slot per architecture "
                f"({need:,} bytes needed; {names}). Raise cache.hbm_bytes or lower "
                "cache.kv_bytes_per_slot."
            ],
        )
    left = budget
    for plan in groups:
        plan.slots = 1
        left -= plan.slot_bytes
    dealt = True
    while dealt:
        dealt = False
        for plan in groups:
            if plan.slots < len(plan.units) and plan.slot_bytes <= left:
                plan.slots += 1
                left -= plan.slot_bytes
                dealt = True


def build_groups(
    config: PoolConfig, plans: list[GroupPlan], engines: SlotEngineFactory = vllm_slot_engine
) -> dict[str, SlotGroup]:
    """Slot groups for the plans that swap, keyed by expert name, sharing one host budget.
    `engines` builds each slot's engine."""
    swapping = [p for p in plans if p.swaps]
    host_budget = config.cache.host_bytes
    if host_budget is None:
        host_budget = default_host_budget()
    records = [new_record(u, p.unit_bytes[u.name]) for p in swapping for u in p.units]
    residency = ResidencyManager(records, host_budget, config.cache.rate_half_life_s)
    out: dict[str, SlotGroup] = {}
    for plan in swapping:
        t = plan.template
        slots = []
        for i in range(plan.slots):
            unit = plan.units[i]
            spec = VllmSpec(
                model=unit.path,
                dtype=t.dtype,
                max_model_len=t.max_model_len,
                options=t.vllm,
                worker_extension=WORKER_EXTENSION,
            )
            # The group restarts a slot's engine itself (autostart off): see VllmLocalEngine.
            engine = engines(f"{plan.key}#{i}", spec, False)
            slots.append(Slot(i, engine, unit.name))
        group = SlotGroup(
            plan.key,
            plan.units,
            slots,
            residency,
            max_wait_s=config.cache.max_wait_s,
            queue_s={name: config.deadlines_for(name).queue_s for name in plan.experts},
        )
        for unit in plan.units:
            residency.owners[unit.name] = group
        for name in plan.experts:
            out[name] = group
    return out


def planned_residency(config: PoolConfig) -> dict[str, dict[str, object]]:
    """Per expert, where its weights start: slot group, slots, tier and checkpoint bytes.

    Without a running server this is the plan; `coe experts` overlays the live status.
    """
    out: dict[str, dict[str, object]] = {}
    for plan in plan_groups(config):
        booted = {u.name for u in plan.units[: plan.slots]}
        for unit in plan.units:
            for expert in unit.experts:
                out[expert] = {
                    "group": plan.key,
                    "slots": plan.slots,
                    "checkpoints": len(plan.units),
                    "tier": "hbm" if unit.name in booted else "disk",
                    "bytes": plan.unit_bytes[unit.name],
                    "hits": 0,
                }
    return out


def build_sleepers(
    config: PoolConfig, plans: list[GroupPlan], engines: SlotEngineFactory = vllm_slot_engine
) -> dict[str, SleepingExpertEngine]:
    """CUDA only: solo engines behind one sleep coordinator, keyed by expert name. `engines`
    builds each solo engine."""
    sleepers = [p for p in plans if p.sleeps]
    if not sleepers:
        return {}
    budget = config.cache.hbm_bytes
    assert budget is not None
    shared = sum(p.slot_bytes * p.slots for p in plans if not p.sleeps)
    host = config.cache.host_bytes if config.cache.host_bytes is not None else default_host_budget()
    solos, solo_engines, paths = [], {}, {}
    for plan in sleepers:
        unit = plan.units[0]
        weights = plan.unit_bytes[unit.name]
        solos.append(SoloEngine(unit.name, weights, plan.slot_bytes - weights))
        options = plan.template.vllm.model_copy(update={"enable_sleep_mode": True})
        spec = VllmSpec(
            unit.path, plan.template.dtype, plan.template.max_model_len, options, WORKER_EXTENSION
        )
        solo_engines[unit.name] = engines(unit.name, spec, True)
        paths[unit.name] = unit.path
    planner = SleepPlanner(solos, budget - shared, host, config.cache.rate_half_life_s)
    coordinator = SleepCoordinator(planner, solo_engines, paths)
    return {
        name: SleepingExpertEngine(name, plan.units[0].name, coordinator)
        for plan in sleepers
        for name in plan.experts
    }
