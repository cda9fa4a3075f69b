"""One engine per distinct backend, shared by every expert that is a configuration of it.

The default pool defines several experts (system prompt, sampling) on one model: they all use a
single vLLM engine instead of starting one each. Checkpoints that share an architecture but not
weights share the slots of a weight-cache group (coe.cache) when there are fewer slots than
checkpoints (cache.hbm_bytes in experts.yaml).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

from coe.cache.group import SlotExpertEngine, SlotGroup
from coe.cache.plan import build_groups, build_sleepers, plan_groups
from coe.cache.sleep import SleepingExpertEngine
from coe.cache.status import StatusFile
from coe.config import Expert, PoolConfig
from coe.engines.base import Engine
from coe.engines.remote import RemoteEngine
from coe.engines.vllm_local import VllmLocalEngine, VllmSpec


def engine_key(config: PoolConfig, expert: Expert) -> Hashable:
    if expert.engine == "remote":
        assert expert.remote is not None
        return ("remote", expert.remote.base_url, expert.remote.model)
    return VllmSpec(
        model=config.resolve_model(expert),
        dtype=expert.dtype,
        max_model_len=expert.max_model_len,
        options=expert.vllm,
    )


def default_engine_factory(config: PoolConfig, expert: Expert, name: str) -> Engine:
    key = engine_key(config, expert)
    if isinstance(key, VllmSpec):
        return VllmLocalEngine(name, key)
    assert expert.remote is not None
    return RemoteEngine(name, expert.remote)


EngineFactory = Callable[[PoolConfig, Expert, str], Engine]


class EnginePool:
    def __init__(
        self,
        config: PoolConfig,
        factory: EngineFactory = default_engine_factory,
        *,
        policy: str = "grouped",
    ):
        self.config = config
        self._by_key: dict[Hashable, Engine] = {}
        self._for_expert: dict[str, Engine] = {}
        self.groups: dict[str, SlotGroup] = {}
        group_of: dict[str, SlotGroup] = {}
        sleeper_of: dict[str, SleepingExpertEngine] = {}
        if factory is default_engine_factory:
            plans = plan_groups(config)
            group_of = build_groups(config, plans, policy)
            sleeper_of = build_sleepers(config, plans)
        for expert in config.experts:
            if expert.name in sleeper_of:
                sleeper = sleeper_of[expert.name]
                self._by_key[("sleeps", sleeper.unit)] = sleeper  # type: ignore[assignment]
                self._for_expert[expert.name] = sleeper  # type: ignore[assignment]
                continue
            group = group_of.get(expert.name)
            if group is not None:
                self.groups[group.key] = group
                self._for_expert[expert.name] = SlotExpertEngine(expert.name, group)
                continue
            key = engine_key(config, expert)
            if key not in self._by_key:
                # The first expert on an engine names it; the others share it.
                self._by_key[key] = factory(config, expert, expert.name)
            self._for_expert[expert.name] = self._by_key[key]
        self._status: StatusFile | None = None
        if self.groups:
            status = self._status = StatusFile(config.source)
            residency = next(iter(self.groups.values())).residency
            residency.listeners.append(lambda force: status.write(self.cache_status, force))

    def engine_for(self, expert: str) -> Engine:
        return self._for_expert[expert]

    @property
    def engines(self) -> list[Engine]:
        """Engines outside weight-cache groups, one per distinct backend."""
        return list(self._by_key.values())

    def _owner(self, expert: str) -> Engine | SlotGroup:
        engine = self._for_expert[expert]
        return engine.group if isinstance(engine, SlotExpertEngine) else engine

    def prefetch(self, expert: str) -> None:
        """A routing decision named this expert: let the weight cache start moving it up."""
        engine = self._for_expert.get(expert)
        if isinstance(engine, SlotExpertEngine):
            engine.prefetch()

    async def start(self, experts: list[str] | None = None) -> None:
        names = experts if experts is not None else list(self._for_expert)
        unique = {id(self._owner(n)): self._owner(n) for n in names}
        for owner in unique.values():  # one at a time: two engine starts on 2 cores thrash
            await owner.start()

    def cache_status(self) -> list[dict[str, object]]:
        """Per checkpoint: tier, bytes, hits (weight-cache groups; plain engines are resident)."""
        rows: list[dict[str, object]] = []
        for group in self.groups.values():
            rows.extend(group.status())
        return rows

    async def shutdown(self) -> None:
        owners = [*self._by_key.values(), *self.groups.values()]
        await asyncio.gather(*(o.shutdown() for o in owners))
        if self._status is not None:
            self._status.remove()
