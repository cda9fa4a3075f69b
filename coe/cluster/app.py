"""The pool as a Ray Serve application, built from experts.yaml's `cluster:` section.

    serve run coe.cluster.app:build_app config=experts.yaml     (or `coe serve --ray`)

Deployments: ``gateway`` (coe's HTTP gateway, the application's ingress) and one per
`cluster.deployments` entry (coe's engines and weight cache for the experts it lists). Their
replica counts, autoscaling bounds and actor options (CPUs, GPUs, custom resources that place
them on nodes) come from the file; expert deployments route with ResidencyRequestRouter unless
`cluster.routing` asks for Serve's default.
"""

from __future__ import annotations

from typing import Any

from coe.cluster.gateway import GatewayReplica
from coe.cluster.replica import ExpertReplica
from coe.config import GATEWAY_DEPLOYMENT, ActorOptions, ClusterDeployment, PoolConfig, load_config

RESIDENCY_ROUTER = "coe.cluster.request_router:ResidencyRequestRouter"
# Every replica of this application runs with these (on top of an expert's own `env:`).
BASE_ENV = {"HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def actor_options(actor: ActorOptions) -> dict[str, Any]:
    """experts.yaml's `actor:` as Ray's ray_actor_options."""
    options: dict[str, Any] = {
        key: value
        for key, value in (
            ("num_cpus", actor.num_cpus),
            ("num_gpus", actor.num_gpus),
            ("memory", actor.memory),
        )
        if value is not None
    }
    if actor.resources:
        options["resources"] = dict(actor.resources)
    options["runtime_env"] = {"env_vars": {**BASE_ENV, **actor.env}}
    return options


def replica_counts(spec: ClusterDeployment) -> dict[str, Any]:
    if spec.min_replicas is None or spec.max_replicas is None:
        return {"num_replicas": spec.replicas}
    return {
        "autoscaling_config": {
            "min_replicas": spec.min_replicas,
            "max_replicas": spec.max_replicas,
            "initial_replicas": spec.replicas,
        }
    }


def expert_deployment(config: PoolConfig, spec: ClusterDeployment) -> Any:
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    router: dict[str, Any] = {
        "request_routing_stats_period_s": config.cluster.stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 3 * config.cluster.stats_period_s),
    }
    if config.cluster.routing == "residency":
        router["request_router_class"] = RESIDENCY_ROUTER
    return serve.deployment(ExpertReplica).options(
        name=spec.name,
        max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options=actor_options(spec.actor),
        request_router_config=RequestRouterConfig(**router),
        **replica_counts(spec),
    )


def gateway_deployment(config: PoolConfig) -> Any:
    from ray import serve

    ingress = serve.ingress()(GatewayReplica)
    return serve.deployment(ingress).options(
        name=GATEWAY_DEPLOYMENT,
        num_replicas=config.cluster.gateway.replicas,
        max_ongoing_requests=1000,
        ray_actor_options=actor_options(config.cluster.gateway.actor),
    )


def build_app(args: dict[str, str]) -> Any:
    """Serve's application builder. ``args``: ``config`` (experts.yaml's path, as every node
    sees it), optionally ``redis_url`` (overrides store.url)."""
    config_path = args["config"]
    config = load_config(config_path)
    handles = {
        spec.name: expert_deployment(config, spec).bind(config_path, spec.name)
        for spec in config.cluster_deployments
    }
    return gateway_deployment(config).bind(config_path, handles, args.get("redis_url"))
