"""docker-compose.yml, examples/experts.compose.yaml and examples/experts.gpu.yaml describe one
deployment: every expert has its vLLM server, served under the expert's name with the expert's
model and settings, and the gateway's config points at those servers and the Redis service."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from coe.config import PoolConfig, load_config

from .conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
GPU_POOL = REPO / "examples" / "experts.gpu.yaml"
COMPOSE_POOL = REPO / "examples" / "experts.compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def gpu() -> PoolConfig:
    return load_config(GPU_POOL)


@pytest.fixture(scope="module")
def served() -> PoolConfig:
    return load_config(COMPOSE_POOL)


def flags(command: list[str]) -> dict[str, str | bool]:
    """--key value pairs of a command line; a flag without a value maps to True."""
    out: dict[str, str | bool] = {}
    for i, arg in enumerate(command):
        if arg.startswith("--"):
            nxt = command[i + 1] if i + 1 < len(command) else None
            out[arg[2:]] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


def test_every_expert_has_a_server_matching_its_settings(
    compose: dict[str, Any], gpu: PoolConfig
) -> None:
    services = compose["services"]
    servers = {name for name in services if name.startswith("vllm-")}
    assert servers == {f"vllm-{e.name}" for e in gpu.experts}
    for expert in gpu.experts:
        args = flags(services[f"vllm-{expert.name}"]["command"])
        assert args["model"] == expert.model
        assert args["served-model-name"] == expert.name
        assert args["dtype"] == expert.dtype
        assert int(args["max-model-len"]) == expert.max_model_len
        assert float(args["gpu-memory-utilization"]) == expert.vllm.gpu_memory_utilization
        assert args.get("enable-sleep-mode") is True and expert.vllm.enable_sleep_mode
        assert args["port"] == "8000"
        assert "healthcheck" in services[f"vllm-{expert.name}"]


def test_the_gateway_config_is_the_gpu_pool_behind_those_servers(
    compose: dict[str, Any], gpu: PoolConfig, served: PoolConfig
) -> None:
    assert served.expert_names == gpu.expert_names
    for mine, theirs in zip(served.experts, gpu.experts, strict=True):
        assert mine.engine == "remote" and mine.remote is not None
        url = urlparse(mine.remote.base_url)
        assert url.hostname == f"vllm-{mine.name}" and url.hostname in compose["services"]
        assert url.port == 8000 and url.path == "/v1"
        assert mine.remote.model == mine.name  # the server's --served-model-name
        assert mine.sampling == theirs.sampling
        assert mine.system_prompt == theirs.system_prompt
        assert mine.max_model_len == theirs.max_model_len
    assert served.categories == gpu.categories
    assert served.router.fallback == gpu.router.fallback
    assert served.router.path is not None  # the shipped router, copied into the image


def test_the_gateway_service_wires_config_redis_and_keys(
    compose: dict[str, Any], served: PoolConfig
) -> None:
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]
    assert env["COE_CONFIG"] == "/app/" + str(COMPOSE_POOL.relative_to(REPO))
    redis = urlparse(env["COE_REDIS_URL"])
    assert redis.hostname == "redis" and "redis" in compose["services"]
    assert served.store.url == env["COE_REDIS_URL"]
    assert "COE_API_KEYS" in env  # bound beyond loopback: keys are required
    assert set(gateway["depends_on"]) == {s for s in compose["services"] if s != "gateway"}
    assert flags(gateway["command"])["host"] == "0.0.0.0"
    dockerfile = (REPO / gateway["build"] / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["coe"]' in dockerfile
    for copied in ("coe", "routers", "examples"):
        assert f"COPY {copied} " in dockerfile
