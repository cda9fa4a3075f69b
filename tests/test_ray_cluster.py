"""The pool on Ray Serve, on a real local cluster: a head node and two worker nodes, each on a
loopback address of its own; two gateway replicas on the head; an expert deployment with two
replicas (one per worker node), each running a real vLLM engine whose one weight-cache slot
holds gemma-3-270m or a variant of it; a real Redis shared by the gateway replicas.

One cluster serves the whole module (it takes a minute or two to come up); the tests run in
file order, the destructive ones (node loss) last, and the last one checks that teardown leaves
no process of the cluster behind.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from coe.models.variants import prepared_variant
from tests.conftest import TEST_EXPERT_DEFAULTS, RedisProcess, free_port

pytestmark = [pytest.mark.engine, pytest.mark.ray]

HEAD, WORKER_A, WORKER_B, WORKER_C = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
KEY = "test-key-for-the-ray-gateway-0123456789"
LIMITED_KEY = "limited-key-for-the-ray-gateway-0123456789"
LIMIT = 4


def pool_config(model_dir: Path, redis_url: str) -> dict[str, Any]:
    from coe.gateway.auth import hash_key

    expert = {**TEST_EXPERT_DEFAULTS, "prompt_format": "qa", "sampling": {"temperature": 0.0}}
    return {
        "experts": [
            {**expert, "name": "base", "model": str(model_dir)},
            {**expert, "name": "variant", "model": str(prepared_variant(1))},
        ],
        "categories": [{"name": "general", "expert": "base"}],
        # One slot per replica: base and variant share it, swapping through host RAM.
        "cache": {"hbm_bytes": 2 * 1024**3},
        "store": {"url": redis_url},
        "deadlines": {"queue_s": 5, "first_token_s": 60},
        "gateway": {
            "api_keys": [
                {"name": "tester", "sha256": hash_key(KEY)},
                {
                    "name": "limited",
                    "sha256": hash_key(LIMITED_KEY),
                    "limits": {"requests_per_minute": LIMIT},
                },
            ]
        },
        "cluster": {
            "stats_period_s": 0.5,
            "gateway": {"replicas": 2, "actor": {"num_cpus": 0, "resources": {"gateway": 1}}},
            "deployments": [
                {
                    "name": "pool",
                    "experts": ["base", "variant"],
                    "replicas": 2,
                    "actor": {"num_cpus": 1, "resources": {"expert_node": 1}},
                }
            ],
        },
    }


@dataclass
class RayPool:
    cluster: Any
    url: str
    workers: dict[str, Any]

    def chat(
        self, model: str, content: str, key: str = KEY, cache: bool = True, **extra: Any
    ) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        headers = {"authorization": f"Bearer {key}"}
        if not cache:  # the request must reach an expert replica, whatever Redis holds
            headers["x-coe-cache-control"] = "no-cache"
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=120
        )


def serve_errors(pool: RayPool) -> str:
    """The tracebacks in the cluster's Serve logs: what a failed assertion shows."""
    found = []
    for log in Path(pool.cluster.temp_dir).glob("session_*/logs/serve/*.log"):
        text = log.read_text(errors="replace")
        at = text.find("Traceback")
        if at >= 0:
            found.append(f"== {log.name}\n{text[at : at + 4000]}")
    return "\n".join(found)[-12000:]


def replica_stats(count: int = 2, tries: int = 40) -> dict[str, dict[str, Any]]:
    """Each expert replica's stats, by replica id (calls without an expert land anywhere)."""
    from ray import serve

    handle = serve.get_deployment_handle("pool", app_name="coe")
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
        if len(seen) >= count:
            break
    return seen


def swaps(stats: dict[str, dict[str, Any]]) -> int:
    return sum(int(row["swaps_in"]) for s in stats.values() for row in s["cache"])


@pytest.fixture(scope="module")
def ray_pool(
    model_dir: Path, redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayPool]:
    from ray import serve

    from coe.cluster.app import build_app
    from coe.cluster.local import LocalCluster, NodeSpec

    path = tmp_path_factory.mktemp("ray") / "experts.yaml"
    path.write_text(yaml.safe_dump(pool_config(model_dir, redis_server.url)))
    cluster = LocalCluster(NodeSpec(HEAD, num_cpus=1, resources={"gateway": 2}))
    workers = {
        ip: cluster.add_node(NodeSpec(ip, num_cpus=1, resources={"expert_node": 1}))
        for ip in (WORKER_A, WORKER_B)
    }
    cluster.connect()
    port = free_port()
    serve.start(http_options={"host": HEAD, "port": port}, proxy_location="HeadOnly")
    serve.run(build_app({"config": str(path)}), name="coe", route_prefix="/")
    pool = RayPool(cluster, f"http://{HEAD}:{port}", workers)
    try:
        yield pool
    finally:
        if pool.cluster is not None:
            pool.cluster.shutdown()


def test_replicas_are_placed_by_their_resources(ray_pool: RayPool) -> None:
    from ray._private.state import actors  # the GCS's table: no dashboard needed

    placed: dict[str, list[str]] = {}
    for actor in actors().values():
        name = actor["ActorClassName"]
        if actor["State"] == "ALIVE" and name.startswith("ServeReplica:coe:"):
            placed.setdefault(name.split(":")[-1], []).append(actor["Address"]["IPAddress"])
    assert sorted(placed["pool"]) == [WORKER_A, WORKER_B]
    assert placed["gateway"] == [HEAD, HEAD]
    stats = replica_stats()
    assert {s["node_ip"] for s in stats.values()} == {WORKER_A, WORKER_B}


def test_the_gateway_answers_through_serve_with_routing_headers(ray_pool: RayPool) -> None:
    response = ray_pool.chat("base", "What is 2+2?", max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.headers["x-coe-expert"] == "base"
    assert response.headers["x-coe-gateway-replica"]
    assert response.json()["choices"][0]["message"]["content"].strip()


def test_a_response_cached_by_one_gateway_replica_is_a_hit_on_the_other(ray_pool: RayPool) -> None:
    prompt = f"Name a colour. ({time.time()})"
    first = ray_pool.chat("base", prompt, max_tokens=4, temperature=0)
    assert first.status_code == 200, first.text
    assert first.headers["x-coe-cache"] == "miss"
    filled_by = first.headers["x-coe-gateway-replica"]
    for _ in range(30):
        again = ray_pool.chat("base", prompt, max_tokens=4, temperature=0)
        assert again.status_code == 200, again.text
        assert again.headers["x-coe-cache"] == "hit"
        assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        if again.headers["x-coe-gateway-replica"] != filled_by:
            return
    pytest.fail("30 requests all reached the gateway replica that filled the cache")


def test_a_rate_limit_holds_across_gateway_replicas(ray_pool: RayPool) -> None:
    answers = [
        ray_pool.chat("base", f"Count to {i}.", key=LIMITED_KEY, max_tokens=1)
        for i in range(3 * LIMIT)
    ]
    codes = [a.status_code for a in answers]
    assert codes.count(200) == LIMIT, codes
    assert codes.count(429) == 2 * LIMIT, codes
    assert answers[-1].json()["error"]["type"] in ("rate_limit_exceeded", "rate_limit_error")
    # Both replicas took part: a limit kept per replica would have let each pass LIMIT.
    assert len({a.headers["x-coe-gateway-replica"] for a in answers}) == 2


def test_requests_land_where_their_expert_is_resident(ray_pool: RayPool) -> None:
    # Warm-up: each expert gets a replica (one swap at most, the first time variant is asked).
    for model in ("base", "variant", "base", "variant"):
        response = ray_pool.chat(model, "Say hi.", max_tokens=2)
        assert response.status_code == 200, (response.text, serve_errors(ray_pool))
    time.sleep(1.5)  # a fresh routing-stats report from both replicas
    before = replica_stats()
    for i in range(10):
        model = ("base", "variant")[i % 2]
        response = ray_pool.chat(model, f"Say hi {i}.", max_tokens=2)
        assert response.status_code == 200, response.text
    after = replica_stats()
    assert swaps(after) == swaps(before), (before, after)
    resident = sorted(
        row["experts"][0] for s in after.values() for row in s["cache"] if row["tier"] == "hbm"
    )
    assert resident == ["base", "variant"]


def stream_until_cut(pool: RayPool, out: dict[str, Any], started: threading.Event) -> None:
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": 400,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream(
        "POST",
        f"{pool.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=120,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    out["events"] = events
    out["ended"] = time.monotonic()


def test_a_node_lost_mid_stream_ends_the_stream_with_an_error_event(ray_pool: RayPool) -> None:
    stats = replica_stats()
    holder = next(
        s
        for s in stats.values()
        if any(r["tier"] == "hbm" and "base" in r["experts"] for r in s["cache"])
    )
    out: dict[str, Any] = {}
    started = threading.Event()
    client = threading.Thread(target=stream_until_cut, args=(ray_pool, out, started))
    client.start()
    assert started.wait(120), "the stream never started"
    killed_at = time.monotonic()
    ray_pool.cluster.kill_node(ray_pool.workers.pop(holder["node_ip"]))
    client.join(timeout=60)
    assert not client.is_alive(), "the stream did not end after its node was lost"
    assert out["ended"] - killed_at < 10
    last = [e for e in out["events"] if e != "[DONE]"][-1]
    assert "error" in json.loads(last), out["events"][-3:]
    # The other replica takes base over (a swap on it).
    response = ray_pool.chat("base", "What is 3+3?", max_tokens=4)
    assert response.status_code == 200, response.text


def test_with_no_replica_left_a_request_gets_503_within_the_deadline(ray_pool: RayPool) -> None:
    for ip in list(ray_pool.workers):
        ray_pool.cluster.kill_node(ray_pool.workers.pop(ip))
    started = time.monotonic()
    response = ray_pool.chat("variant", "Hello?", max_tokens=4, cache=False)
    took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"]
    assert took < 5 + 10  # deadlines.queue_s, plus slack for a loaded machine


def test_a_replacement_node_brings_the_deployment_back(ray_pool: RayPool) -> None:
    from coe.cluster.local import NodeSpec

    joined = time.monotonic()
    ray_pool.workers[WORKER_C] = ray_pool.cluster.add_node(
        NodeSpec(WORKER_C, num_cpus=1, resources={"expert_node": 1})
    )
    while time.monotonic() - joined < 240:
        response = ray_pool.chat("base", "What is 1+1?", max_tokens=4)
        if response.status_code == 200:
            break
        time.sleep(2)
    assert response.status_code == 200, response.text
    print(f"serving again {time.monotonic() - joined:.1f} s after a node joined")


def test_teardown_leaves_no_process_behind(ray_pool: RayPool) -> None:
    cluster, ray_pool.cluster = ray_pool.cluster, None
    left = cluster.shutdown()
    assert left == set()
    assert not os.path.exists(cluster.temp_dir)
