"""One replica of the gateway deployment: coe's own FastAPI gateway, served by Ray Serve.

The replica builds what `coe serve` builds (router, store, orchestrator, ChatService, app), with
one difference: every in-process expert is a ServeEngine that streams from its expert
deployment, so the gateway replicas hold no weights and can run anywhere. Redis (store.url) is
what makes several replicas one gateway: the response cache, rate limits and sessions live there.

Each answer names the gateway replica that served it (``x-coe-gateway-replica``), so a test or
an operator can tell replicas apart behind Serve's proxy.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coe.cache.pool import EnginePool, default_engine_factory
from coe.cluster.serve_engine import ServeEngine
from coe.config import CacheBudgets, Expert, PoolConfig, load_config
from coe.engines.base import Engine
from coe.gateway.app import create_app
from coe.gateway.live import LivePool
from coe.gateway.server import build_service, open_store_on_loop
from coe.orchestrator import Orchestrator

REPLICA_HEADER = "x-coe-gateway-replica"


def gateway_pool(config: PoolConfig, handles: dict[str, Any]) -> EnginePool:
    """The gateway replica's engines: a ServeEngine per in-process expert (its deployment
    holds the engine and the weight cache), the expert's own engine for a remote one."""
    deployment_of = {e: d.name for d in config.cluster_deployments for e in d.experts}
    # Experts whose replicas may move weights (a weight-cache budget and several checkpoints
    # in the deployment): worth a prefetch call. Judged from the file alone: the gateway's node
    # need not hold the checkpoints the cache plan would read.
    cached: set[str] = set()
    if config.cache.hbm_bytes is not None:
        for d in config.cluster_deployments:
            if len({config.expert(e).model for e in d.experts}) > 1:
                cached.update(d.experts)

    def factory(pool: PoolConfig, expert: Expert, name: str) -> Engine:
        deployment = deployment_of.get(expert.name)
        if deployment is None:
            return default_engine_factory(pool, expert, name)
        queue_s = config.deadlines_for(expert.name).queue_s
        return ServeEngine(
            name, deployment, handles[deployment], queue_s, prefetches=expert.name in cached
        )

    # The weight cache lives in the expert replicas; planned here it would want engines.
    return EnginePool(config.model_copy(update={"cache": CacheBudgets()}), factory)


class GatewayReplica:
    async def __init__(
        self, config_path: str, handles: dict[str, Any], redis_url: str | None = None
    ):
        from ray import serve

        config = load_config(config_path)
        router = None
        if config.router.path is not None:
            from coe.router.router import TwoStageRouter

            router = TwoStageRouter.from_config(config)
        # As `coe serve`: $COE_REDIS_URL (a Secret on Kubernetes) overrides store.url.
        url = redis_url or os.environ.get("COE_REDIS_URL") or config.store.url
        store = await open_store_on_loop(url)
        self.orchestrator = Orchestrator(
            config, engines=gateway_pool(config, handles), router=router, store=store
        )
        await self.orchestrator.start()
        self.service, self.keys = build_service(self.orchestrator)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> ASGIApp:
        # Serve redeploys a cluster's pool as a whole; /admin/reload says so.
        app = create_app(LivePool(self.service, self.keys, reloadable=False))
        return NameReplica(app, self.replica_id)

    async def __del__(self) -> None:
        await self.orchestrator.close()
        await self.orchestrator.store.close()


class NameReplica:
    """ASGI middleware: every HTTP answer carries the replica's id."""

    def __init__(self, app: ASGIApp, replica_id: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named)
