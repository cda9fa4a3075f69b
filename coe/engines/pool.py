"""One engine per distinct backend, shared by every expert that is a configuration of it.

The default pool defines several experts (system prompt, sampling) on one model: they all use a
single vLLM engine instead of starting one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

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
    def __init__(self, config: PoolConfig, factory: EngineFactory = default_engine_factory):
        self.config = config
        self._by_key: dict[Hashable, Engine] = {}
        self._for_expert: dict[str, Engine] = {}
        for expert in config.experts:
            key = engine_key(config, expert)
            if key not in self._by_key:
                # The first expert on an engine names it; the others share it.
                self._by_key[key] = factory(config, expert, expert.name)
            self._for_expert[expert.name] = self._by_key[key]

    def engine_for(self, expert: str) -> Engine:
        return self._for_expert[expert]

    @property
    def engines(self) -> list[Engine]:
        return list(self._by_key.values())

    def experts_on(self, engine: Engine) -> list[str]:
        return [name for name, e in self._for_expert.items() if e is engine]

    async def start(self, experts: list[str] | None = None) -> None:
        names = experts if experts is not None else list(self._for_expert)
        unique = {id(self._for_expert[n]): self._for_expert[n] for n in names}
        for engine in unique.values():  # one at a time: two engine starts on 2 cores thrash
            await engine.start()

    async def shutdown(self) -> None:
        await asyncio.gather(*(e.shutdown() for e in self._by_key.values()))
