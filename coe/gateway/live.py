"""A gateway whose pool changes while it serves: experts.yaml reloaded (SIGHUP, POST
/admin/reload) and adapters loaded or unloaded by name (POST/DELETE /admin/adapters).

What the gateway serves is a *generation*: a ChatService (orchestrator, router, engines) and
the API keys of one experts.yaml. A reload builds the next generation beside the current one:
it reads and checks the file exactly as `coe serve` does at start (a broken file is refused with
the same messages and nothing changes), loads the router, and builds an EnginePool that takes
over every running engine whose key is unchanged (and the weight cache when its plan is), so
only new engines start. Then new requests go to the new generation; requests in flight finish
on the one they started with, and engines no expert uses any more are shut down once the old
generation has no request left (or its longest deadline has passed).

Adapters loaded through /admin live beside the file's experts until unloaded or the gateway
restarts (put them in experts.yaml to keep them); a file reload keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coe.config import PoolConfig, parse_config, read_config_data
from coe.errors import BadRequestError, ConfigurationError, UnavailableError
from coe.gateway.auth import KeyRing
from coe.gateway.service import ChatService
from coe.orchestrator import Orchestrator
from coe.requestlog import RequestLog

log = logging.getLogger(__name__)


class ReloadRefusedError(BadRequestError):
    """The new experts.yaml (or adapter) is not one the gateway would start with; the message
    is the start-time error. The pool is unchanged."""


class ReloadFailedError(UnavailableError):
    """The new pool did not start (an engine failed); the pool is unchanged."""


class NotReloadableError(BadRequestError):
    """This gateway cannot change its pool (it was not started from an experts.yaml file)."""


@dataclass
class Generation:
    """One experts.yaml's service and keys, and the HTTP requests that started on it."""

    number: int
    service: ChatService
    keys: KeyRing
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


@dataclass(frozen=True)
class ReloadReport:
    generation: int
    added: list[str]
    removed: list[str]
    changed: list[str]
    engines_started: int
    engines_kept: int
    engines_retiring: int
    router: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "experts": {"added": self.added, "removed": self.removed, "changed": self.changed},
            "engines": {
                "started": self.engines_started,
                "kept": self.engines_kept,
                "retiring": self.engines_retiring,
            },
            "router": self.router,
            "seconds": round(self.seconds, 3),
        }


class LivePool:
    """The gateway's current generation, and the one way to replace it.

    ``reloadable``: whether this gateway may rebuild its pool from its experts.yaml (a gateway
    of a Ray Serve application is redeployed instead, and says so)."""

    def __init__(self, service: ChatService, keys: KeyRing, *, reloadable: bool = True):
        self.current = Generation(1, service, keys)
        self.reloadable = reloadable
        # Adapter experts loaded through /admin, by name: entries added to the file's experts.
        self.adapters: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        # The first generation's engines belong to whoever built its service (and close it);
        # the engines started by reloads are this object's to shut down.
        self._first = service.orch.engines
        self._pools = [service.orch.engines]

    @property
    def service(self) -> ChatService:
        return self.current.service

    @property
    def keys(self) -> KeyRing:
        return self.current.keys

    @property
    def config(self) -> PoolConfig:
        return self.current.service.config

    # -- changing the pool -------------------------------------------------------------------
    async def reload(self) -> ReloadReport:
        """Read experts.yaml again (and the router folder) and serve it."""
        async with self._lock:
            return await self._replace(self.adapters)

    async def load_adapter(self, entry: dict[str, Any]) -> ReloadReport:
        """Add an adapter expert (an experts.yaml entry with name, base and adapter)."""
        name = entry.get("name")
        if not isinstance(name, str) or not entry.get("adapter") or not entry.get("base"):
            raise ReloadRefusedError("an adapter needs name, base and adapter (a PEFT folder)")
        async with self._lock:
            if name in self.config.expert_names:
                raise ReloadRefusedError(
                    f"expert {name!r} exists already; unload it first or pick another name"
                )
            return await self._replace({**self.adapters, name: dict(entry)})

    async def unload_adapter(self, name: str) -> ReloadReport:
        async with self._lock:
            if name not in self.adapters:
                where = (
                    "it is defined in experts.yaml: remove it there and reload"
                    if name in self.config.expert_names
                    else "no adapter of that name was loaded"
                )
                raise ReloadRefusedError(f"cannot unload {name!r}: {where}")
            return await self._replace({k: v for k, v in self.adapters.items() if k != name})

    async def _replace(self, adapters: dict[str, dict[str, Any]]) -> ReloadReport:
        if not self.reloadable:
            raise NotReloadableError(
                "this gateway's pool is deployed as a whole (Ray Serve): redeploy to change it"
            )
        t0 = time.perf_counter()
        old = self.current
        config = await asyncio.to_thread(self._read, old.service.config.source, adapters)
        router = await asyncio.to_thread(_load_router, config)
        engines = old.service.orch.engines.successor(config)
        requests = old.service.orch.requests
        if config.log != old.service.config.log:  # a new `log:` section: a log of its own
            requests = RequestLog.open(config, requests.front_end)
        orchestrator = Orchestrator(config, engines, router, old.service.store, requests)
        try:
            await orchestrator.start()
        except Exception as exc:
            await _abandon(engines, old.service.orch.engines)
            if requests is not old.service.orch.requests:
                await asyncio.to_thread(requests.close)
            raise ReloadFailedError(
                f"the new pool did not start ({exc}); the old pool keeps serving"
            ) from exc
        service = ChatService(orchestrator, config.gateway)
        keys = KeyRing.for_gateway(config.gateway)
        self.current = Generation(old.number + 1, service, keys)
        self.adapters = adapters
        self._pools.append(engines)
        before = {o.name: o for o in old.service.config.experts}
        after = {e.name: e for e in config.experts}
        old_owners = {id(o) for o in old.service.orch.engines.owners()}
        new_owners = engines.owners()
        kept = sum(id(o) in old_owners for o in new_owners)
        task = asyncio.get_running_loop().create_task(self._retire(old, orchestrator))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        report = ReloadReport(
            generation=self.current.number,
            added=sorted(after.keys() - before.keys()),
            removed=sorted(before.keys() - after.keys()),
            changed=sorted(n for n in after.keys() & before.keys() if after[n] != before[n]),
            engines_started=len(new_owners) - kept,
            engines_kept=kept,
            engines_retiring=len(old_owners) - kept,
            router=str(config.router.path) if router is not None else "none",
            seconds=time.perf_counter() - t0,
        )
        log.warning("pool reloaded: %s", report.as_dict())
        return report

    @staticmethod
    def _read(source: Path | None, adapters: dict[str, dict[str, Any]]) -> PoolConfig:
        """experts.yaml as `coe serve` would start it, plus the adapters loaded at run time."""
        from coe.prompts.registry import check_strategy_names

        if source is None:
            raise NotReloadableError("the pool was not read from an experts.yaml file")
        path, data = read_config_data(source)
        if adapters and isinstance(data, dict) and isinstance(data.get("experts"), list):
            named = {e.get("name") for e in data["experts"] if isinstance(e, dict)}
            # The file wins over an adapter of the same name loaded at run time.
            extra = [entry for name, entry in adapters.items() if name not in named]
            data = {**data, "experts": [*data["experts"], *extra]}
        try:
            config = parse_config(data, path)
            check_strategy_names(config)
        except ConfigurationError as exc:
            raise ReloadRefusedError(str(exc)) from None
        return config

    async def _retire(self, old: Generation, successor: Orchestrator) -> None:
        """Once the old generation's requests are done (or its longest deadline passed), shut
        down the engines the new pool did not take over."""
        config = old.service.config
        longest = max(config.deadlines_for(e).total_s for e in config.expert_names)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(old.idle.wait(), longest)
        if old.service.orch.requests is not successor.requests:
            await asyncio.to_thread(old.service.orch.requests.close)
        try:
            dropped = await old.service.orch.engines.retire(successor.engines)
        except Exception:
            log.exception("shutting down the engines of the previous pool failed")
            return
        finally:
            if old.service.orch.engines in self._pools:
                self._pools.remove(old.service.orch.engines)
        if dropped:
            log.warning("previous pool retired: %d engine(s) shut down", len(dropped))

    async def close(self) -> None:
        """The server is stopping: stop waiting for old requests, and shut down every engine
        a reload started (the first generation's are its builder's to close)."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        first = {id(o) for o in self._first.owners()}
        for pool in self._pools:
            if pool is not self._first:  # the first is its builder's, supervisor and all
                await pool.supervisor.stop()
        started = {id(o): o for pool in self._pools for o in pool.owners() if id(o) not in first}
        await asyncio.gather(*(o.shutdown() for o in started.values()), return_exceptions=True)
        self._pools = [self._first]


def _load_router(config: PoolConfig) -> Any:
    if config.router.path is None:
        return None
    from coe.router.router import TwoStageRouter

    try:
        return TwoStageRouter.from_config(config)
    except ConfigurationError as exc:
        raise ReloadRefusedError(str(exc)) from None


async def _abandon(new: Any, old: Any) -> None:
    """A reload failed: shut down what the new pool started that the old one does not own."""
    keep = {id(o) for o in old.owners()}
    with contextlib.suppress(Exception):
        await new.supervisor.stop()
    started = [o for o in new.owners() if id(o) not in keep]
    await asyncio.gather(*(o.shutdown() for o in started), return_exceptions=True)
