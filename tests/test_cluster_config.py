"""experts.yaml's `cluster:` section: what it accepts, the errors that name the key, and what
`coe serve --ray` derives from it (fast: no Ray cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from coe.cluster.app import actor_options, replica_counts
from coe.cluster.launch import resources_needed
from coe.config import ConfigError, parse_config
from tests.conftest import coe, pool_dict


def config_with(cluster: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**pool_dict(), "cluster": cluster, **extra}


def problems(cluster: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(cluster), "experts.yaml")
    return str(caught.value)


def test_without_deployments_every_in_process_expert_is_in_one_named_experts() -> None:
    config = parse_config(pool_dict(), "experts.yaml")
    [only] = config.cluster_deployments
    assert only.name == "experts" and only.experts == ["qa", "chatty"]
    assert config.cluster.gateway.replicas == 2


def test_an_unknown_expert_in_a_deployment_is_named_with_its_key() -> None:
    text = problems({"deployments": [{"name": "d", "experts": ["qa", "chatty", "nobody"]}]})
    assert "cluster.deployments[0].experts[2]: 'nobody' is not a defined expert" in text


def test_an_expert_in_two_deployments_is_refused() -> None:
    text = problems(
        {
            "deployments": [
                {"name": "a", "experts": ["qa", "chatty"]},
                {"name": "b", "experts": ["qa"]},
            ]
        }
    )
    assert "cluster.deployments[1].experts[0]: 'qa' is already in deployment 'a'" in text


def test_an_in_process_expert_left_out_of_every_deployment_is_refused() -> None:
    text = problems({"deployments": [{"name": "a", "experts": ["qa"]}]})
    assert "experts[1]: 'chatty' runs in process but no cluster.deployments entry lists it" in text


def test_autoscaling_bounds_come_in_pairs_and_hold_the_start_count() -> None:
    assert "set both min_replicas and max_replicas" in problems(
        {"deployments": [{"name": "a", "experts": ["qa", "chatty"], "min_replicas": 1}]}
    )
    assert "cluster.deployments[0].replicas: 5 is outside min_replicas..max_replicas" in problems(
        {
            "deployments": [
                {"name": "a", "experts": ["qa", "chatty"], "replicas": 5, "min_replicas": 1,
                 "max_replicas": 3}
            ]
        }
    )  # fmt: skip


def test_the_gateway_deployment_name_is_reserved_and_typos_are_named() -> None:
    assert "'gateway' is the gateway's deployment" in problems(
        {"deployments": [{"name": "gateway", "experts": ["qa", "chatty"]}]}
    )
    assert "num_gpu" in problems({"gateway": {"actor": {"num_gpu": 1}}})


def test_deployment_options_become_serve_options() -> None:
    config = parse_config(
        config_with(
            {
                "deployments": [
                    {
                        "name": "a",
                        "experts": ["qa", "chatty"],
                        "replicas": 2,
                        "min_replicas": 1,
                        "max_replicas": 4,
                        "actor": {"num_gpus": 1, "resources": {"big": 1}, "env": {"X": "1"}},
                    }
                ]
            }
        ),
        "experts.yaml",
    )
    [spec] = config.cluster_deployments
    assert replica_counts(spec) == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2}
    }
    options = actor_options(spec.actor)
    assert options["num_gpus"] == 1 and "num_cpus" not in options  # Serve's default then
    assert options["resources"] == {"big": 1}
    assert options["runtime_env"]["env_vars"]["X"] == "1"
    # The local cluster offers what every replica asks for at the autoscaling ceiling.
    assert resources_needed(config) == {"big": 4}


def test_serve_ray_refuses_a_non_loopback_host_for_its_own_cluster(tmp_path: Path) -> None:
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(pool_dict()))
    result = coe("--config", str(path), "serve", "--ray", "--host", "10.1.2.3", "--allow-open",
                 timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "binds loopback only" in result.stderr and "--ray-address" in result.stderr
