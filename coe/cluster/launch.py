"""`coe serve --ray`: deploy the pool's Serve application on a cluster and keep it running.

With a cluster address (`--ray-address`, or cluster.address in experts.yaml) coe joins that
cluster, deploys, and on Ctrl-C deletes its application, leaving the cluster to its owner.
Without one, coe starts a one-node cluster of its own on the loopback address it serves on,
offering the custom resources experts.yaml's actors ask for, and stops it (its own processes
only) on the way out.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from coe.cluster.local import ClusterStartError, LocalCluster, NodeSpec, require_ray
from coe.config import PoolConfig

APP_NAME = "coe"


def resources_needed(config: PoolConfig) -> dict[str, float]:
    """The custom resources all replicas ask for together (at their largest replica count)."""
    total: Counter[str] = Counter()
    for name, amount in config.cluster.gateway.actor.resources.items():
        total[name] += amount * config.cluster.gateway.replicas
    for spec in config.cluster_deployments:
        count = max(spec.replicas, spec.max_replicas or 0)
        for name, amount in spec.actor.resources.items():
            total[name] += amount * count
    return dict(total)


@dataclass
class Deployed:
    url: str
    cluster: LocalCluster | None

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.cluster is not None:
            self.cluster.shutdown()
            return
        serve.delete(APP_NAME)
        ray.shutdown()


def deploy(
    config: PoolConfig,
    host: str,
    port: int,
    address: str | None,
    cpus: float,
    redis_url: str | None = None,
) -> Deployed:
    """Deploy the pool, on the cluster at ``address`` or a local one; returns once it serves."""
    require_ray()
    import ray
    from ray import serve

    from coe.cluster.app import build_app

    assert config.source is not None
    cluster = None
    if address is None:
        cluster = LocalCluster(NodeSpec(host, num_cpus=cpus, resources=resources_needed(config)))
        cluster.connect()
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        args = {"config": str(config.source)}
        if redis_url:
            args["redis_url"] = redis_url
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    except Exception as exc:
        Deployed(f"http://{host}:{port}", cluster).stop()
        raise ClusterStartError(f"the pool did not start on Ray Serve: {exc}") from exc
    return Deployed(f"http://{host}:{port}", cluster)


def wait_forever(deployed: Deployed) -> None:
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        deployed.stop()
