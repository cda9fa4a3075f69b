"""`coe bench gateway --ray`: the gateway's overhead through two gateway replicas on Ray Serve,
beside a single `coe serve` gateway, measured in the same run.

- Single gateway: `coe bench gateway`'s measurement (coe.bench.gateway): the same request
  straight to an in-process engine and through the HTTP gateway, interleaved.
- On Ray: a local cluster on loopback (head 127.0.0.2 with the two gateway replicas and Serve's
  proxy, a worker 127.0.0.3 with the expert deployment's one replica and its own engine). The
  reference is a call straight to the expert deployment from this process (its handle: the
  replica's engine plus one Ray hop); the measured path is HTTP through Serve's proxy, a gateway
  replica and its handle to the expert replica. Interleaved the same way.

The target: Ray's overhead p50 within 2x the single gateway's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from coe.bench.gateway import PROMPT, GatewayBench
from coe.bench.report import percentile_ms, print_table
from coe.config import PoolConfig

HEAD, WORKER = "127.0.0.2", "127.0.0.3"
TARGET_RATIO = 2.0


@dataclass
class RayGatewayBench:
    expert: str
    requests: int
    tokens: int
    gateway_replicas: int
    single_overhead_p50_ms: float
    single_overhead_p99_ms: float
    single_direct_p50_ms: float
    ray_direct_p50_ms: float
    ray_gateway_p50_ms: float
    ray_gateway_p99_ms: float
    ray_overhead_p50_ms: float
    ray_overhead_p99_ms: float
    ratio_p50: float
    replicas_seen: int
    target_ratio: float = TARGET_RATIO

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def print_table(self) -> None:
        print_table(
            f"gateway overhead on Ray Serve: expert {self.expert}, {self.tokens} token(s), "
            f"{self.requests} requests, {self.gateway_replicas} gateway replicas",
            ("measure", "p50 ms", "p99 ms", "note"),
            [
                ("single gateway: overhead (no request log)", f"{self.single_overhead_p50_ms}",
                 f"{self.single_overhead_p99_ms}", "reference (coe serve, same run)"),
                ("Ray: expert deployment, direct", f"{self.ray_direct_p50_ms}", "",
                 "handle call from this process"),
                ("Ray: through a gateway replica", f"{self.ray_gateway_p50_ms}",
                 f"{self.ray_gateway_p99_ms}", f"answered by {self.replicas_seen} replicas"),
                ("Ray: overhead", f"{self.ray_overhead_p50_ms}", f"{self.ray_overhead_p99_ms}",
                 f"{self.ratio_p50}x the single gateway's (target <= {self.target_ratio}x)"),
            ],
        )  # fmt: skip


def ray_pool_file(config: PoolConfig, expert: str, folder: Path) -> Path:
    """experts.yaml for the benchmark's Ray pool: the one expert, one replica on the worker."""
    entry = config.expert(expert).model_dump(mode="json", exclude_none=True)
    entry["model"] = config.resolve_model(config.expert(expert))
    data = {
        "experts": [entry],
        "categories": [{"name": "general", "expert": expert}],
        "router": {"fallback": "general"},
        "cluster": {
            "gateway": {"replicas": 2, "actor": {"num_cpus": 0, "resources": {"gateway": 1}}},
            "deployments": [
                {
                    "name": "experts",
                    "experts": [expert],
                    "actor": {"num_cpus": 1, "resources": {"expert_node": 1}},
                }
            ],
        },
    }
    path = folder / "experts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_ray_gateway_bench(
    config: PoolConfig, expert: str, single: GatewayBench, requests: int, tokens: int
) -> RayGatewayBench:
    """Start the Ray pool, measure it, stop it (every process it started)."""
    from ray import serve

    from coe.cluster.app import build_app
    from coe.cluster.local import LocalCluster, NodeSpec
    from coe.cluster.replica import prompt_to_wire

    folder = Path(tempfile.mkdtemp(prefix="coe-bench-ray-"))
    path = ray_pool_file(config, expert, folder)
    cluster = LocalCluster(NodeSpec(HEAD, num_cpus=1, resources={"gateway": 2}))
    try:
        cluster.add_node(NodeSpec(WORKER, num_cpus=1, resources={"expert_node": 1}))
        cluster.connect()
        port = _free_port(HEAD)
        serve.start(http_options={"host": HEAD, "port": port}, proxy_location="HeadOnly")
        serve.run(build_app({"config": str(path)}), name="coe", route_prefix="/")
        handle = serve.get_deployment_handle("experts", app_name="coe")
        chosen = config.expert(expert)
        from coe.types import Message, Prompt

        prompt = prompt_to_wire(
            Prompt(messages=(Message("user", PROMPT),), format=chosen.prompt_format)
        )
        sampling = {"max_tokens": tokens, "temperature": 0.0, "top_p": 1.0}

        def direct() -> None:
            chunks = handle.options(stream=True).generate.remote(
                expert=expert, prompt=prompt, sampling=sampling
            )
            list(chunks)

        body = {
            "model": expert,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens,
            "temperature": 0,
        }
        replicas: set[str] = set()
        with httpx.Client(base_url=f"http://{HEAD}:{port}", timeout=60) as http:

            def through() -> None:
                r = http.post(
                    "/v1/chat/completions", json=body, headers={"x-coe-cache-control": "no-cache"}
                )
                r.raise_for_status()
                replicas.add(r.headers["x-coe-gateway-replica"])

            for _ in range(5):
                direct()
                through()
            direct_s, gateway_s = [], []
            for _ in range(requests):
                for fn, out in ((direct, direct_s), (through, gateway_s)):
                    t0 = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t0)
    finally:
        cluster.shutdown()
    overhead = [g - d for g, d in zip(gateway_s, direct_s, strict=True)]
    ray_p50 = round(1000 * statistics.median(overhead), 3)
    # The Ray gateway replicas keep no request log: compare with the single one's without it.
    single_p50 = single.unlogged_overhead_p50_ms
    return RayGatewayBench(
        expert=expert,
        requests=len(gateway_s),
        tokens=tokens,
        gateway_replicas=2,
        single_overhead_p50_ms=single_p50,
        single_overhead_p99_ms=single.unlogged_overhead_p99_ms,
        single_direct_p50_ms=single.direct_p50_ms,
        ray_direct_p50_ms=percentile_ms(direct_s, 0.5),
        ray_gateway_p50_ms=percentile_ms(gateway_s, 0.5),
        ray_gateway_p99_ms=percentile_ms(gateway_s, 0.99),
        ray_overhead_p50_ms=ray_p50,
        ray_overhead_p99_ms=percentile_ms(overhead, 0.99),
        ratio_p50=round(ray_p50 / single_p50, 2) if single_p50 else 0.0,
        replicas_seen=len(replicas),
    )


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
