"""What /health and /health/ready say, from each expert's engine state and the store's ping.

- ready: every expert the router can send to (a category's expert) is up, and the store
  answers. /health/ready answers 503 otherwise, so a load balancer stops sending traffic.
- status: ``unavailable`` when a routed expert is down or starting, or the store is
  misconfigured (a wrong password: no request that needs it can be served); ``degraded`` when
  the gateway serves every routed request but something is missing (Redis: no cache, limits,
  sessions; an expert only reachable by name); ``ok`` otherwise.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from coe.engines.base import EngineHealth
from coe.gateway import metrics
from coe.gateway.schema import ExpertHealth, HealthResponse, StoreHealth
from coe.store import Store


async def check_store(store: Store) -> StoreHealth:
    """The store by a live check: unreachable degrades the gateway, misconfigured makes it
    unavailable (requests that need the store get 503)."""
    up = await store.ping()
    metrics.STORE_HEALTHY.set(1 if up else 0)
    return StoreHealth(kind=store.kind, healthy=up, state=store.state, problem=store.problem)


def summarize(
    experts: Mapping[str, EngineHealth],
    routed: Collection[str],
    store: StoreHealth,
) -> HealthResponse:
    routed_up = all(experts[name].up for name in routed if name in experts)
    everything_up = all(h.up for h in experts.values())
    if not routed_up or store.state == "misconfigured":
        status = "unavailable"
    elif not store.healthy or not everything_up:
        status = "degraded"
    else:
        status = "ok"
    return HealthResponse(
        status=status,
        ready=routed_up and store.healthy,
        engines={name: h.up for name, h in experts.items()},
        experts={
            name: ExpertHealth(state=h.state, reason=h.reason, routed=name in routed)
            for name, h in experts.items()
        },
        store=store,
    )
