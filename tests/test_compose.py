"""docker-compose.yml, examples/experts.compose.yaml and examples/experts.gpu.yaml describe one
deployment: every expert has its vLLM server, served under the expert's name with the expert's
model and settings, and the gateway's config points at those servers and the Redis service.

And the deployment is closed: no vLLM development endpoints, every vLLM server requires the key
in $VLLM_API_KEY, every remote expert sends it, only the gateway publishes a port. The checks
read the parsed YAML, and the file as `docker compose config` renders it where Docker Compose is
installed (else the same interpolation, done here, of the ${VAR:?} and ${VAR:-} forms it uses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
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
        # Sleep mode is reachable only through vLLM's dev endpoints, which stay off here.
        assert "enable-sleep-mode" not in args
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


# -- closed by default ------------------------------------------------------------------------

TEST_ENV = {
    "COE_API_KEYS": "coe-" + "k" * 43,
    "VLLM_API_KEY": "vllm-test-key-0123456789abcdef0123",
    "HF_TOKEN": "",
}
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[?-])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """What compose does to the file: ${VAR:?message} is required (unset or empty refuses),
    ${VAR:-default} falls back, ${VAR} is the value or empty."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        found = env.get(m["name"], "")
        if m["op"] == "?" and not found:
            raise MissingVariable(f"{m['name']}: {m['arg']}")
        if m["op"] == "-" and not found:
            return m["arg"]
        return found

    return _VARIABLE.sub(one, value)


def has_docker_compose() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


def rendered(env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml with the variables of ``env`` filled in: by `docker compose config`
    where it is installed, else by interpolate(). MissingVariable when a required one is unset."""
    if has_docker_compose():
        clean = {k: v for k, v in os.environ.items() if k not in TEST_ENV}
        run = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**clean, **env},
            cwd=REPO,
        )
        if run.returncode != 0:
            raise MissingVariable(run.stderr)
        return json.loads(run.stdout)
    raw = yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the <<: *vllm merges
    return interpolate(raw, env)


def strings(node: Any) -> Iterator[str]:
    """Every key and scalar of a parsed YAML document, as text."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    else:
        yield str(node)


def vllm_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = {n: s for n, s in doc["services"].items() if "vllm" in str(s.get("image", ""))}
    assert services, "no vLLM server found in docker-compose.yml"
    return services


def test_no_vllm_dev_mode_anywhere(compose: dict[str, Any]) -> None:
    for doc in (compose, rendered(TEST_ENV)):
        found = [s for s in strings(doc) if "VLLM_SERVER_DEV_MODE" in s]
        assert found == [], found
        for name, service in doc["services"].items():
            # An env file could switch it back on behind the YAML's back.
            assert "env_file" not in service, name


def test_every_vllm_server_requires_the_key(compose: dict[str, Any]) -> None:
    servers = vllm_services(compose)
    assert set(servers) == {n for n in compose["services"] if n.startswith("vllm-")}
    for name, service in servers.items():
        args = flags(service["command"])
        # Required: compose refuses to start without it rather than serve with an empty key.
        assert re.fullmatch(r"\$\{VLLM_API_KEY:\?.+\}", str(args.get("api-key"))), name
        # Reachable only from the compose network, through the gateway.
        assert "ports" not in service, name
        # vLLM's key guards /v1 only: a healthcheck outside /v1 works without it.
        probe = " ".join(service["healthcheck"]["test"])
        assert "/health" in probe and "/v1" not in probe, name
    for name, service in vllm_services(rendered(TEST_ENV)).items():
        assert flags(service["command"])["api-key"] == TEST_ENV["VLLM_API_KEY"], name


def test_a_missing_vllm_key_is_refused() -> None:
    with pytest.raises(MissingVariable, match="VLLM_API_KEY"):
        rendered({k: v for k, v in TEST_ENV.items() if k != "VLLM_API_KEY"})


def test_every_remote_expert_sends_the_servers_key(
    compose: dict[str, Any], served: PoolConfig
) -> None:
    for expert in served.experts:
        assert expert.remote is not None
        assert expert.remote.api_key_env == "VLLM_API_KEY", expert.name
    # The gateway container has that variable, from the same required setting as the servers.
    gateway_env = compose["services"]["gateway"]["environment"]
    assert re.fullmatch(r"\$\{VLLM_API_KEY:\?.+\}", gateway_env["VLLM_API_KEY"])
    env = rendered(TEST_ENV)["services"]["gateway"]["environment"]
    assert env["VLLM_API_KEY"] == TEST_ENV["VLLM_API_KEY"]
