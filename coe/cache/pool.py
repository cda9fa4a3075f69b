"""One engine per distinct backend, shared by every expert that is a configuration of it.

The default pool defines several experts (system prompt, sampling) on one model: they all use a
single vLLM engine instead of starting one each. Checkpoints that share an architecture but not
weights share the slots of a weight-cache group (coe.cache) when there are fewer slots than
checkpoints (cache.hbm_bytes in experts.yaml).

The weight cache is planned from experts.yaml whatever engines the pool is given: `factory`
builds plain engines, `slot_factory` the engines the cache runs itself (slots, sleepers).

Once started, the pool's supervisor (supervisor.py) restarts any in-process engine that crashes;
``health()`` says per expert whether its engine is up, down or starting, and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any

from coe.cache import metrics
from coe.cache.group import SlotExpertEngine, SlotGroup
from coe.cache.plan import GroupPlan, build_groups, build_sleepers, plan_groups
from coe.cache.slot import SlotEngineFactory, vllm_slot_engine
from coe.cache.status import StatusFile
from coe.cache.supervisor import Supervised, Supervisor
from coe.config import Expert, PoolConfig
from coe.engines.base import Engine, EngineHealth, engine_health
from coe.engines.registry import engine_kind
from coe.errors import ConfigurationError


def engine_key(config: PoolConfig, expert: Expert) -> Hashable:
    """Experts with equal keys share one engine (the expert's engine kind decides)."""
    return engine_kind(expert.engine).engine_key(config, expert)


def default_engine_factory(config: PoolConfig, expert: Expert, name: str) -> Engine:
    return engine_kind(expert.engine).build(config, expert, name)


EngineFactory = Callable[[PoolConfig, Expert, str], Engine]


def _cache_signature(config: PoolConfig, plans: list[GroupPlan]) -> tuple[object, ...]:
    """What the weight cache's engines and bookkeeping are built from: a reload keeps the
    running cache when this is unchanged (an expert's prompt or sampling is not part of it)."""
    return (
        config.cache,
        tuple(
            (p.key, tuple(p.units), tuple(sorted(p.unit_bytes.items())), p.slots, p.slot_bytes,
             tuple(p.experts), p.sleeps, p.template.dtype, p.template.max_model_len,
             p.template.vllm, tuple(config.deadlines_for(e).queue_s for e in p.experts))
            for p in plans
        ),
    )  # fmt: skip


class CacheFactoryError(ConfigurationError):
    """The pool was given engines of its own but none for the weight cache its config plans."""


class EnginePool:
    def __init__(
        self,
        config: PoolConfig,
        factory: EngineFactory = default_engine_factory,
        *,
        slot_factory: SlotEngineFactory = vllm_slot_engine,
        reuse: EnginePool | None = None,
    ):
        """``reuse``: a running pool whose engines this one takes over where they fit (the
        same engine key; the weight cache when its plan is unchanged): a reload starts only
        the engines it lacks. See ``successor``."""
        self.config = config
        self.factory = factory
        self.slot_factory = slot_factory
        self._by_key: dict[Hashable, Engine] = {}
        self._for_expert: dict[str, Engine] = {}
        self.groups: dict[str, SlotGroup] = {}
        plans = plan_groups(config)
        cached = [name for p in plans if p.swaps or p.sleeps for name in p.experts]
        if cached and factory is not default_engine_factory and slot_factory is vllm_slot_engine:
            # Serving these experts with `factory`'s engines would silently drop the cache, and
            # serving them with vLLM engines beside injected ones would mix real and fake.
            raise CacheFactoryError(
                f"experts {', '.join(cached)} are served through the weight cache "
                "(cache.hbm_bytes in experts.yaml), whose engines come from slot_factory: pass "
                "one beside factory"
            )
        self._cache_signature = _cache_signature(config, plans)
        if reuse is not None and reuse._cache_signature == self._cache_signature:
            group_of, sleeper_of = reuse._group_of, reuse._sleeper_of
        else:
            group_of = build_groups(config, plans, slot_factory)
            sleeper_of = build_sleepers(config, plans, slot_factory)
        self._group_of, self._sleeper_of = group_of, sleeper_of
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
            own_view = getattr(engine_kind(expert.engine), "for_expert", None)
            if factory is not default_engine_factory and getattr(expert, "adapter", None):
                # Injected engines (a Ray gateway's handles to its deployments, a test's) know
                # nothing of adapters: a LoRA expert gets one of its own, asked by its name.
                key, own_view = ("expert", expert.name), None
            if key not in self._by_key:
                # The first expert on an engine names it; the others share it.
                running = reuse._by_key.get(key) if reuse is not None else None
                self._by_key[key] = running or factory(config, expert, expert.name)
            # An engine kind may give an expert its own view of the shared engine (a LoRA
            # adapter expert sends its adapter with each request).
            shared = self._by_key[key]
            self._for_expert[expert.name] = own_view(config, expert, shared) if own_view else shared
        self._status: StatusFile | None = None
        self._listener: Callable[[bool], None] | None = None
        if self.groups or self._adapter_residencies():
            status = self._status = StatusFile(config.source)
            self._listener = lambda force: status.write(self.cache_status, force)
        if self.groups and self._listener is not None:
            self._residency().listeners.append(self._listener)
        for residency in self._adapter_residencies():
            # Adapters are the cache's fourth tier: their moves count and show like weights'.
            # One listener per residency, whichever pool (a reload's) took the engine over.
            residency.listeners[:] = [self._adapter_moved]
        # Engines in this process (plain vLLM engines, slot groups, sleepers); a remote server
        # is someone else's to restart.
        self.supervisor = Supervisor(o for o in self.owners() if isinstance(o, Supervised))

    def _adapter_residencies(self) -> list[Any]:
        """The adapter residencies of this pool's LoRA engines (coe.engines.lora)."""
        found = (getattr(e, "adapters", None) for e in self._by_key.values())
        return [r for r in found if r is not None and hasattr(r, "listeners")]

    def _adapter_moved(self, adapter: str, source: str, target: str) -> None:
        metrics.SWAPS.labels("adapter", source, target).inc()
        for tier in ("engine", "host", "disk"):
            metrics.RESIDENCY.labels(adapter, tier).set(1 if tier == target else 0)
        if self._listener is not None:
            self._listener(False)

    def successor(self, config: PoolConfig) -> EnginePool:
        """A pool for a changed experts.yaml that keeps this pool's engines where they fit
        (same engine factories). Start it, then ``retire`` this one."""
        return EnginePool(config, self.factory, slot_factory=self.slot_factory, reuse=self)

    def owners(self) -> list[Engine | SlotGroup]:
        """What this pool starts and shuts down: plain engines, sleepers and slot groups."""
        owners = {id(o): o for o in [*self._by_key.values(), *self.groups.values()]}
        return list(owners.values())

    def _residency(self) -> Any:
        return next(iter(self.groups.values())).residency

    async def retire(self, successor: EnginePool) -> list[Engine | SlotGroup]:
        """Hand over to ``successor`` (already started): stop supervising, and shut down the
        engines it did not take over. The caller waits for this pool's requests first."""
        await self.supervisor.stop()
        if self._listener is not None:
            self._residency().listeners.remove(self._listener)
        kept = {id(o) for o in successor.owners()}
        dropped = [o for o in self.owners() if id(o) not in kept]
        await asyncio.gather(*(o.shutdown() for o in dropped))
        if self._status is not None and successor._status is None:
            self._status.remove()
        return dropped

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
        # Engines that can act on it have a prefetch (a weight-cache slot, an expert deployment
        # on a Ray cluster); the others hold their weights for good.
        prefetch = getattr(self._for_expert.get(expert), "prefetch", None)
        if prefetch is not None:
            prefetch()

    async def start(self, experts: list[str] | None = None) -> None:
        names = experts if experts is not None else list(self._for_expert)
        unique = {id(self._owner(n)): self._owner(n) for n in names}
        for owner in unique.values():  # one at a time: two engine starts on 2 cores thrash
            await owner.start()
        self.supervisor.start()

    async def health(self) -> dict[str, EngineHealth]:
        """Per expert, its engine's state now (experts sharing an engine ask it once)."""
        asked: dict[int, asyncio.Task[EngineHealth]] = {}
        for engine in self._for_expert.values():
            if id(engine) not in asked:
                asked[id(engine)] = asyncio.ensure_future(engine_health(engine))
        await asyncio.gather(*asked.values())
        return {name: asked[id(e)].result() for name, e in self._for_expert.items()}

    def unfinished_requests(self) -> dict[str, int]:
        """Per in-process engine (plain or a cache slot), the requests it holds unfinished."""
        engines = [
            *self._by_key.values(),
            *(s.engine for g in self.groups.values() for s in g.slots),
        ]
        return {
            engine.name: count()
            for engine in engines
            if (count := getattr(engine, "unfinished_requests", None)) is not None
        }

    def cache_status(self) -> list[dict[str, object]]:
        """Per checkpoint: tier, bytes, hits (weight-cache groups; plain engines are resident)."""
        rows: list[dict[str, object]] = []
        for group in self.groups.values():
            rows.extend(group.status())
        for residency in self._adapter_residencies():
            rows.extend(residency.status())
        return rows

    async def shutdown(self) -> None:
        # The supervisor first: it must not restart an engine that is being shut down.
        await self.supervisor.stop()
        await asyncio.gather(*(o.shutdown() for o in self.owners()))
        if self._status is not None:
            self._status.remove()
