"""`coe deploy kuberay`: the RayService manifest generated from experts.yaml.

The checked-in deploy/kuberay/rayservice.yaml must be what the generator makes of
examples/experts.gpu.yaml now; its Serve config must pass Ray Serve's own schema; and the Ray
cluster it describes must hold every replica experts.yaml asks for, the gateway's on the head.
No Ray cluster is started: the checks read the manifest.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from coe.cli import main
from coe.cluster.kuberay import (
    IMPORT_PATH,
    RAY_VERSION,
    REDIS_URL_ENV,
    render_configmap,
    render_manifest,
    render_rayservice,
)
from coe.config import GATEWAY_DEPLOYMENT, ActorOptions, PoolConfig, load_config, parse_config
from coe.errors import BadRequestError

from .conftest import REPO, pool_dict

GPU_POOL = "examples/experts.gpu.yaml"
MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
CONFIG_PATH = "/etc/coe/experts.yaml"


def documents(text: str) -> dict[str, dict[str, Any]]:
    """The manifest's documents by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}


def serve_app(service: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app


def by_name(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in app["deployments"]}


@pytest.fixture(scope="module")
def gpu() -> PoolConfig:
    return load_config(REPO / GPU_POOL)


@pytest.fixture(scope="module")
def checked_in() -> dict[str, dict[str, Any]]:
    return documents(MANIFEST.read_text())


def image_of(service: dict[str, Any]) -> str:
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    return head["template"]["spec"]["containers"][0]["image"]


def generate(*args: str) -> Any:
    """`coe ARGS` in this process, from the repository's root, without $COE_IMAGE."""
    return CliRunner().invoke(main, list(args), env={"COE_IMAGE": None, "COE_CONFIG": None})


# -- the checked-in manifest ---------------------------------------------------------------


def test_checked_in_manifest_is_what_experts_yaml_generates(
    checked_in: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = image_of(checked_in["RayService"])
    command = (
        f"coe --config {GPU_POOL} deploy kuberay --image {image} --out {MANIFEST.relative_to(REPO)}"
    )
    monkeypatch.chdir(REPO)
    run = generate("--config", GPU_POOL, "deploy", "kuberay", "--image", image)
    assert run.exit_code == 0, run.output
    assert run.stdout == MANIFEST.read_text(), (
        f"{MANIFEST.relative_to(REPO)} no longer matches {GPU_POOL}; regenerate it: {command}"
    )


def test_configmap_holds_experts_yaml(checked_in: dict[str, dict[str, Any]]) -> None:
    configmap = checked_in["ConfigMap"]
    assert configmap["data"] == {"experts.yaml": (REPO / GPU_POOL).read_text()}
    # The RayService mounts that ConfigMap where the Serve application is told to read it.
    service = checked_in["RayService"]
    assert serve_app(service)["args"] == {"config": CONFIG_PATH}
    for spec in pod_specs(service):
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == CONFIG_PATH and mount["subPath"] == "experts.yaml"


def test_header_says_how_to_regenerate() -> None:
    head = MANIFEST.read_text().split("\n---\n")[0]
    assert f"coe --config {GPU_POOL} deploy kuberay --image" in head
    assert "COE_REDIS_URL" in head


# -- the Serve application -----------------------------------------------------------------


# Ray Serve's own models still use pydantic v1-style Field extras.
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")
def test_serve_config_passes_ray_serves_schema(checked_in: dict[str, dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(checked_in["RayService"]["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH and app.route_prefix == "/"
    assert app.args == {"config": CONFIG_PATH}


def test_every_deployment_of_experts_yaml_is_served(
    gpu: PoolConfig, checked_in: dict[str, dict[str, Any]]
) -> None:
    served = by_name(serve_app(checked_in["RayService"]))
    wanted = [GATEWAY_DEPLOYMENT, *(d.name for d in gpu.cluster_deployments)]
    assert list(served) == wanted

    gateway = served[GATEWAY_DEPLOYMENT]
    assert gateway["num_replicas"] == gpu.cluster.gateway.replicas
    assert_actor(gateway["ray_actor_options"], gpu.cluster.gateway.actor)
    for d in gpu.cluster_deployments:
        s = served[d.name]
        if d.min_replicas is None:
            assert s["num_replicas"] == d.replicas and "autoscaling_config" not in s
        else:
            assert "num_replicas" not in s
            assert s["autoscaling_config"] == {
                "min_replicas": d.min_replicas,
                "max_replicas": d.max_replicas,
                "initial_replicas": d.replicas,
            }
        assert s["max_ongoing_requests"] == d.max_ongoing_requests
        assert_actor(s["ray_actor_options"], d.actor)


def assert_actor(options: dict[str, Any], actor: ActorOptions) -> None:
    assert options.get("num_cpus") == actor.num_cpus
    assert options.get("num_gpus") == actor.num_gpus
    assert options.get("memory") == actor.memory
    assert options.get("resources", {}) == actor.resources
    assert options.get("runtime_env", {}).get("env_vars", {}) == actor.env


# -- the Ray cluster -----------------------------------------------------------------------


def pod_specs(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def quantity(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", text)
    assert match, text
    return int(match[1]) * UNITS.get(match[2] or "", 1)


def capacity(group: dict[str, Any]) -> dict[str, float]:
    """What Ray sees on one pod of a group: rayStartParams, else the container's limits (as
    KubeRay passes them to `ray start`)."""
    params = group["rayStartParams"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    out = {
        "CPU": float(params["num-cpus"]),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        "memory": float(quantity(limits["memory"])),
    }
    if "resources" in params:
        # '"{\"name\": 1}"': the JSON object, quoted for the shell.
        out.update(json.loads(params["resources"][1:-1].replace('\\"', '"')))
    return out


def demand(options: dict[str, Any]) -> dict[str, float]:
    return {
        "CPU": options.get("num_cpus", 1.0),  # Serve's default
        "GPU": options.get("num_gpus", 0.0),
        "memory": options.get("memory", 0),
        **options.get("resources", {}),
    }


def place(free: list[dict[str, float]], need: dict[str, float]) -> int | None:
    """First fit: the index of the pod that takes the replica, its resources taken."""
    for i, pod in enumerate(free):
        if all(pod.get(k, 0.0) >= v - 1e-9 for k, v in need.items()):
            for k, v in need.items():
                pod[k] -= v
            return i
    return None


@pytest.mark.parametrize("size", ["replicas", "maxReplicas"])
def test_cluster_holds_every_replica_gateways_on_the_head(
    checked_in: dict[str, dict[str, Any]], size: str
) -> None:
    """The pods at the start (replicas), and at the autoscaling ceiling (maxReplicas), hold the
    replicas Serve starts, and the most it may scale to; gateway replicas go first and land on
    the head."""
    service = checked_in["RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    free = [capacity(cluster["headGroupSpec"])]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        free += [capacity(group) for _ in range(group[size])]
    assert free[0]["GPU"] == 0, "the head has no GPUs"

    deployments = serve_app(service)["deployments"]
    for d in deployments:
        scaling = d.get("autoscaling_config")
        if scaling:
            count = scaling["initial_replicas" if size == "replicas" else "max_replicas"]
        else:
            count = d["num_replicas"]
        for _ in range(count):
            where = place(free, demand(d["ray_actor_options"]))
            assert where is not None, f"no pod left for a replica of {d['name']}"
            if d["name"] == GATEWAY_DEPLOYMENT:
                assert where == 0, "a gateway replica outside the head"
            elif d["ray_actor_options"].get("num_gpus"):
                assert where > 0
    # Nothing of a gateway replica's size is left on a GPU pod: it cannot stray there.
    gateway = demand(by_name(serve_app(service))[GATEWAY_DEPLOYMENT]["ray_actor_options"])
    if size == "replicas":
        assert place(free[1:], gateway) is None


def test_gpu_pods_ask_kubernetes_for_their_gpus(checked_in: dict[str, dict[str, Any]]) -> None:
    cluster = checked_in["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["enableInTreeAutoscaling"] is True  # qwen autoscales
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in head["env"]}
    assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
    redis = env[REDIS_URL_ENV]["valueFrom"]["secretKeyRef"]
    assert redis == {"name": "coe-secrets", "key": REDIS_URL_ENV}  # required: not optional


def test_ray_version_is_the_ray_extras_pin() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert f"ray[serve]=={RAY_VERSION}" in extras["ray"]


# -- other pools ---------------------------------------------------------------------------


def cluster_pool(cluster: dict[str, Any], **extra: Any) -> PoolConfig:
    return parse_config({**pool_dict(), "cluster": cluster, **extra}, "experts.yaml")


def test_autoscaling_bounds_render_autoscaling_config() -> None:
    cfg = cluster_pool(
        {
            "deployments": [
                {
                    "name": "pool",
                    "experts": ["qa", "chatty"],
                    "replicas": 2,
                    "min_replicas": 1,
                    "max_replicas": 5,
                    "actor": {"num_cpus": 2, "num_gpus": 1},
                }
            ]
        }
    )
    service = render_rayservice(cfg, image="img", config_path=CONFIG_PATH)
    (_, pool) = serve_app(service)["deployments"]
    assert pool["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 5,
        "initial_replicas": 2,
    }
    assert "num_replicas" not in pool
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 2, 5)
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_shared_gpus_custom_resources_and_env() -> None:
    """Replicas of half a GPU share one per pod, two to a pod; a custom resource is offered by
    the pods of the group that needs it, as the JSON KubeRay passes to `ray start`."""
    cfg = cluster_pool(
        {
            "gateway": {"replicas": 1},
            "deployments": [
                {
                    "name": "small_ones",
                    "experts": ["qa", "chatty"],
                    "replicas": 3,
                    "actor": {
                        "num_cpus": 1,
                        "num_gpus": 0.5,
                        "resources": {"l4": 1},
                        "env": {"OMP_NUM_THREADS": "1"},
                    },
                }
            ],
        }
    )
    service = render_rayservice(cfg, image="img")
    (_, small) = serve_app(service)["deployments"]
    assert small["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.5,
        "resources": {"l4": 1.0},
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}},
    }
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == "small-ones"  # a Kubernetes name
    assert group["replicas"] == 2  # three replicas, two to a pod
    assert capacity(group) == {"CPU": 2.0, "GPU": 1.0, "memory": 67 * 1024**3, "l4": 2.0}
    assert "enableInTreeAutoscaling" not in service["spec"]["rayClusterConfig"]


def test_secret_variables_follow_the_pool() -> None:
    """One gateway replica without store.url needs no Redis; a remote expert's key is required."""
    cfg = parse_config(
        {
            **pool_dict(),
            "experts": [
                *pool_dict()["experts"],
                {
                    "name": "far",
                    "engine": "remote",
                    "remote": {"base_url": "http://x/v1", "model": "m", "api_key_env": "FAR_KEY"},
                },
            ],
            "cluster": {"gateway": {"replicas": 1}},
        },
        "experts.yaml",
    )
    service = render_rayservice(cfg, image="img", name="pool", secret="keys")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    env = {
        e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in head["containers"][0]["env"]
    }
    assert REDIS_URL_ENV not in env
    assert env["FAR_KEY"] == {"name": "keys", "key": "FAR_KEY"}
    assert env["HF_TOKEN"] == {"name": "keys", "key": "HF_TOKEN", "optional": True}
    # Without cluster.deployments: one `experts` deployment with the in-process experts.
    assert list(by_name(serve_app(service))) == [GATEWAY_DEPLOYMENT, "experts"]
    assert render_configmap("x: 1\n", name="pool")["metadata"]["name"] == "pool-experts"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Coe"}, "name 'Coe': lowercase letters"),
        ({"name": "c" * 41}, "at most 40 characters"),
        ({"config_path": "experts.yaml"}, "an absolute path"),
        ({"image": " "}, "image: empty"),
    ],
)
def test_bad_names_are_refused(kwargs: dict[str, str], message: str) -> None:
    cfg = cluster_pool({})
    with pytest.raises(BadRequestError, match=re.escape(message)):
        render_manifest(cfg, "", **{"image": "img", "command": "coe", **kwargs})


def test_cli_needs_an_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    run = generate("--config", GPU_POOL, "deploy", "kuberay")
    assert run.exit_code == 2 and "Missing option '--image'" in run.output
    out = tmp_path / "rayservice.yaml"
    run = generate("--config", GPU_POOL, "deploy", "kuberay", "--image", "img", "--name", "x-1",
                   "--out", str(out))  # fmt: skip
    assert run.exit_code == 0, run.output
    assert (
        run.stdout == "" and documents(out.read_text())["RayService"]["metadata"]["name"] == "x-1"
    )
    assert "deploy kuberay --image img --name x-1`" in out.read_text()
    run = generate("--config", GPU_POOL, "deploy", "kuberay", "--image", "img", "--name", "X")
    assert run.exit_code == 2 and run.output.startswith("error: name 'X'")
