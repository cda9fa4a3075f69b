"""A KubeRay `RayService` for the pool, generated from experts.yaml (`coe deploy kuberay`).

How experts.yaml maps onto the manifest:

- The whole file goes into a ConfigMap, mounted in every pod at ``config_path``; the Serve
  application (``coe.cluster.app:build_app``, args ``{config: config_path}``) reads it there, as
  `coe serve --ray` reads it locally. Paths in experts.yaml relative to the file (router.path,
  categories[].prompts, local models) then resolve next to ``config_path`` in the image.
- ``spec.serveConfigV2``: one application whose deployments are the gateway
  (``cluster.gateway``) and each of ``PoolConfig.cluster_deployments``, under the same names,
  with their replica counts (or autoscaling bounds), ``max_ongoing_requests`` and actor options
  (CPUs, GPUs, memory, custom resources, ``env`` as the replica's ``runtime_env``).
- ``spec.rayClusterConfig``: a head pod without GPUs whose logical CPUs are exactly what the
  gateway replicas ask for, so they run there; and one worker group per distinct replica shape
  (the actor options of a deployment): each pod holds as many replicas of that shape as its
  GPUs allow (one, unless num_gpus is a fraction), and the group's pod counts follow the
  replica counts of its deployments, so the cluster grows only as far as Serve's autoscaling
  may. A worker pod's logical CPUs are exactly its replicas' too, so no gateway replica lands
  on a GPU node.
- The Redis URL (shared by the gateway replicas for sessions, limits and the response cache)
  comes from a Secret as ``$COE_REDIS_URL``, which overrides ``store.url`` as it does for
  `coe serve`: the URL in experts.yaml names a host of the machine the file was written for,
  and a password belongs in a Secret, not a ConfigMap. The same Secret may hold
  ``COE_API_KEYS``, ``HF_TOKEN`` and the remote experts' ``api_key_env`` variables.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from coe.config import (
    DEFAULT_CONFIG_ENV,
    GATEWAY_DEPLOYMENT,
    ActorOptions,
    ClusterDeployment,
    PoolConfig,
)
from coe.errors import BadRequestError
from coe.gateway.auth import API_KEYS_ENV

# The Ray in the image must be this one: it matches the `ray` extra's pin in pyproject.toml.
RAY_VERSION = "2.60.0"
IMPORT_PATH = "coe.cluster.app:build_app"
APP_NAME = "coe"
DEFAULT_NAME = "coe"
DEFAULT_CONFIG_PATH = "/etc/coe/experts.yaml"
SERVE_PORT = 8000

# The variable `coe serve --redis-url` reads; the Serve application honours it the same way.
REDIS_URL_ENV = "COE_REDIS_URL"
HF_TOKEN_ENV = "HF_TOKEN"

GIB = 1024**3
# Serve gives a replica one CPU when its num_cpus is unset; the pods are sized the same way.
SERVE_DEFAULT_NUM_CPUS = 1.0
# Pod memory per replica whose actor options give none: the router and HTTP server of a
# gateway replica; the engine process and host-tier weight copies of an expert replica.
GATEWAY_MEMORY = 2 * GIB
EXPERT_MEMORY = 32 * GIB
# Ray's object store takes 30% of a pod's memory unless told; coe passes only requests and token
# chunks between actors, so a small one leaves the memory to the replicas.
OBJECT_STORE_MEMORY = 1 * GIB
# Beyond the replicas: the object store and GCS, dashboard, Serve controller and proxy on the
# head; the object store, raylet and a Serve proxy on a worker.
HEAD_OVERHEAD_MEMORY = 4 * GIB
WORKER_OVERHEAD_MEMORY = 3 * GIB
# Physical CPUs beyond the logical ones Ray schedules by (the same Ray processes).
OVERHEAD_CPUS = 1

# Kubernetes names are DNS labels; KubeRay appends suffixes (-raycluster-xxxxx, -head-svc) to
# the RayService's name for the objects it derives, which must stay within 63 characters.
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 40
# Worker groups are named after their deployments; past this length, by their position.
MAX_GROUP_NAME_LENGTH = 30


# -- the Serve application -----------------------------------------------------------------


def actor_options(actor: ActorOptions) -> dict[str, Any]:
    """Serve's ``ray_actor_options`` for a replica: only what experts.yaml sets, so Serve's
    own defaults apply to the rest."""
    options: dict[str, Any] = {}
    for key in ("num_cpus", "num_gpus", "memory"):
        value = getattr(actor, key)
        if value is not None:
            options[key] = value
    if actor.resources:
        options["resources"] = dict(actor.resources)
    if actor.env:
        options["runtime_env"] = {"env_vars": dict(actor.env)}
    return options


def gateway_deployment(config: PoolConfig) -> dict[str, Any]:
    gateway = config.cluster.gateway
    return {
        "name": GATEWAY_DEPLOYMENT,
        "num_replicas": gateway.replicas,
        "ray_actor_options": actor_options(gateway.actor),
    }


def expert_deployment(deployment: ClusterDeployment) -> dict[str, Any]:
    out: dict[str, Any] = {"name": deployment.name}
    if deployment.min_replicas is not None and deployment.max_replicas is not None:
        # Serve refuses num_replicas beside autoscaling_config; `replicas` is where it starts.
        out["autoscaling_config"] = {
            "min_replicas": deployment.min_replicas,
            "max_replicas": deployment.max_replicas,
            "initial_replicas": deployment.replicas,
        }
    else:
        out["num_replicas"] = deployment.replicas
    out["max_ongoing_requests"] = deployment.max_ongoing_requests
    out["ray_actor_options"] = actor_options(deployment.actor)
    return out


def serve_config(config: PoolConfig, config_path: str) -> dict[str, Any]:
    """The Serve config (Ray's ``ServeDeploySchema``) of the pool: one application at /."""
    deployments = [gateway_deployment(config)]
    deployments += [expert_deployment(d) for d in config.cluster_deployments]
    application = {
        "name": APP_NAME,
        "import_path": IMPORT_PATH,
        "route_prefix": "/",
        "args": {"config": config_path},
        "deployments": deployments,
    }
    return {"applications": [application]}


# -- the Ray cluster -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What one replica takes of a node, with Serve's defaults filled in."""

    num_cpus: float
    num_gpus: float
    memory: int | None
    resources: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, actor: ActorOptions) -> Shape:
        return cls(
            num_cpus=SERVE_DEFAULT_NUM_CPUS if actor.num_cpus is None else actor.num_cpus,
            num_gpus=actor.num_gpus or 0.0,
            memory=actor.memory,
            resources=tuple(sorted(actor.resources.items())),
        )

    @property
    def gpus_per_pod(self) -> int:
        """Whole GPUs for a pod: a replica's own, rounded up; one shared GPU for fractions."""
        return max(1, math.ceil(self.num_gpus)) if self.num_gpus else 0

    @property
    def replicas_per_pod(self) -> int:
        """Replicas of this shape one pod holds: several only when they share GPUs."""
        if not self.num_gpus:
            return 1
        return max(1, math.floor(self.gpus_per_pod / self.num_gpus + 1e-9))


@dataclass
class WorkerGroup:
    """Worker pods for the deployments whose replicas have one shape."""

    name: str
    shape: Shape
    deployments: list[ClusterDeployment] = field(default_factory=list)

    def pods(self, replicas: Iterable[int]) -> int:
        return math.ceil(sum(replicas) / self.shape.replicas_per_pod)

    @property
    def replicas(self) -> int:
        return self.pods(d.replicas for d in self.deployments)

    @property
    def min_replicas(self) -> int:
        return self.pods(_low(d) for d in self.deployments)

    @property
    def max_replicas(self) -> int:
        return self.pods(_high(d) for d in self.deployments)


def _low(d: ClusterDeployment) -> int:
    return d.replicas if d.min_replicas is None else d.min_replicas


def _high(d: ClusterDeployment) -> int:
    return d.replicas if d.max_replicas is None else d.max_replicas


def worker_groups(config: PoolConfig) -> list[WorkerGroup]:
    """One group per distinct replica shape, in the order the deployments are written."""
    groups: dict[Shape, WorkerGroup] = {}
    for d in config.cluster_deployments:
        shape = Shape.of(d.actor)
        groups.setdefault(shape, WorkerGroup(name="", shape=shape)).deployments.append(d)
    taken: set[str] = set()
    for i, group in enumerate(groups.values(), start=1):
        group.name = _group_name(group, i, taken)
        taken.add(group.name)
    return list(groups.values())


def _group_name(group: WorkerGroup, position: int, taken: set[str]) -> str:
    """A group's name says which deployments run there (Serve allows _ and capitals; Kubernetes
    labels, which carry the name, do not)."""
    name = "-".join(d.name for d in group.deployments).lower().replace("_", "-")
    if len(name) > MAX_GROUP_NAME_LENGTH or name in taken:
        name = f"workers-{position}"
    return name


def _cpus(value: float) -> str:
    """A Kubernetes CPU quantity: whole CPUs, else millicores."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def _bytes(value: int) -> str:
    """A Kubernetes memory quantity, in the largest binary unit that divides it."""
    for unit, size in (("Gi", GIB), ("Mi", 1024**2), ("Ki", 1024)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _custom_resources(resources: dict[str, float]) -> str:
    """rayStartParams' ``resources``: KubeRay passes the value to a shell as is, so the JSON
    object goes inside double quotes with its own quotes escaped."""
    text = json.dumps(resources, sort_keys=True).replace('"', '\\"')
    return f'"{text}"'


@dataclass(frozen=True)
class PodSettings:
    """What every pod of the cluster shares: the image, its environment, experts.yaml."""

    image: str
    env: list[dict[str, Any]]
    configmap: str
    config_path: str

    def volumes(self) -> list[dict[str, Any]]:
        return [{"name": "experts-yaml", "configMap": {"name": self.configmap}}]

    def mounts(self) -> list[dict[str, Any]]:
        # subPath mounts the one file, so the rest of its folder in the image (a router, prompt
        # regions that experts.yaml names by relative path) stays visible.
        path = PurePosixPath(self.config_path)
        return [
            {
                "name": "experts-yaml",
                "mountPath": str(path),
                "subPath": path.name,
                "readOnly": True,
            }
        ]

    def container(self, name: str, resources: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "image": self.image,
            "env": self.env,
            "resources": resources,
            "volumeMounts": self.mounts(),
        }


def head_group(config: PoolConfig, pod: PodSettings) -> dict[str, Any]:
    gateway = config.cluster.gateway
    shape = Shape.of(gateway.actor)
    cpus = math.ceil(gateway.replicas * shape.num_cpus)
    memory = gateway.replicas * (shape.memory or GATEWAY_MEMORY) + HEAD_OVERHEAD_MEMORY
    container = pod.container(
        "ray-head",
        {
            # No CPU limit: throttling would stall token streams; Ray schedules by num-cpus.
            "requests": {"cpu": _cpus(cpus + OVERHEAD_CPUS), "memory": _bytes(memory)},
            "limits": {"memory": _bytes(memory)},
        },
    )
    container["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": SERVE_PORT, "name": "serve"},
    ]
    params = {
        # The operator reaches the dashboard (and through it Serve) at the pod's IP, so it
        # must listen on every interface, not on loopback.
        "dashboard-host": "0.0.0.0",
        # Exactly the gateway replicas' CPUs: they run here, and nothing else fits.
        "num-cpus": str(cpus),
        # Explicit: on some GPU nodes a container without a GPU limit still sees the GPUs.
        "num-gpus": "0",
        "object-store-memory": str(OBJECT_STORE_MEMORY),
    }
    if shape.resources:
        params["resources"] = _custom_resources(_times(shape.resources, gateway.replicas))
    return {
        "rayStartParams": params,
        "template": {"spec": {"containers": [container], "volumes": pod.volumes()}},
    }


def _times(resources: tuple[tuple[str, float], ...], count: int) -> dict[str, float]:
    """A pod's custom resources: its replicas' together (whole numbers written as such)."""
    total = {key: value * count for key, value in resources}
    return {key: int(v) if float(v).is_integer() else v for key, v in total.items()}


def worker_group_spec(group: WorkerGroup, pod: PodSettings) -> dict[str, Any]:
    shape, per_pod = group.shape, group.shape.replicas_per_pod
    cpus = math.ceil(per_pod * shape.num_cpus)
    memory = per_pod * (shape.memory or EXPERT_MEMORY) + WORKER_OVERHEAD_MEMORY
    resources: dict[str, Any] = {
        "requests": {"cpu": _cpus(cpus + OVERHEAD_CPUS), "memory": _bytes(memory)},
        "limits": {"memory": _bytes(memory)},
    }
    if shape.gpus_per_pod:
        # KubeRay gives Ray num-gpus from this limit.
        resources["limits"]["nvidia.com/gpu"] = str(shape.gpus_per_pod)
    container = pod.container("ray-worker", resources)
    # vLLM's engine processes talk through shared memory; a container's /dev/shm is 64 MiB.
    container["volumeMounts"] = [
        *container["volumeMounts"],
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [*pod.volumes(), {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if shape.gpus_per_pod:
        # GPU node pools are commonly tainted so that only GPU pods land there.
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    # Exactly the replicas' CPUs, so that no gateway replica (which needs CPU) lands here.
    params = {"num-cpus": str(cpus), "object-store-memory": str(OBJECT_STORE_MEMORY)}
    if shape.resources:
        params["resources"] = _custom_resources(_times(shape.resources, per_pod))
    return {
        "groupName": group.name,
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": params,
        "template": {"spec": spec},
    }


# -- environment and Secret ----------------------------------------------------------------


@dataclass(frozen=True)
class SecretVar:
    name: str
    required: bool
    why: str


def secret_vars(config: PoolConfig) -> list[SecretVar]:
    """The variables the pods take from the Secret, each under its own name as the key."""
    out: list[SecretVar] = []
    if config.store.url is not None or config.cluster.gateway.replicas > 1:
        # Gateway replicas without one Redis would each keep their own sessions and limits;
        # a missing Secret keeps the pods from starting, with the reason in `kubectl describe`.
        out.append(SecretVar(REDIS_URL_ENV, True, "redis://… the gateway replicas share"))
    out.append(SecretVar(API_KEYS_ENV, False, "clients' keys, comma-separated"))
    out.append(SecretVar(HF_TOKEN_ENV, False, "for gated Hugging Face models"))
    for e in config.experts:
        remote = getattr(e, "remote", None)  # the remote engine kind's options
        env = getattr(remote, "api_key_env", None)
        if env and env not in {v.name for v in out}:
            out.append(SecretVar(env, True, f"the key of remote expert {e.name}"))
    return out


def pod_env(config: PoolConfig, config_path: str, secret: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        # `coe` run in a pod (kubectl exec … coe experts) reads the same file.
        {"name": DEFAULT_CONFIG_ENV, "value": config_path},
    ]
    for var in secret_vars(config):
        ref: dict[str, Any] = {"name": secret, "key": var.name}
        if not var.required:
            ref["optional"] = True
        env.append({"name": var.name, "valueFrom": {"secretKeyRef": ref}})
    return env


# -- the manifests -------------------------------------------------------------------------


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "coe", "app.kubernetes.io/instance": name}


def configmap_name(name: str) -> str:
    return f"{name}-experts"


def secret_name(name: str) -> str:
    return f"{name}-secrets"


def check_names(name: str, config_path: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        raise BadRequestError(
            f"name '{name}': lowercase letters, digits and '-', starting with a letter, at most "
            f"{MAX_NAME_LENGTH} characters (KubeRay derives longer names from it)"
        )
    path = PurePosixPath(config_path)
    if not path.is_absolute() or path.name in ("", ".", ".."):
        raise BadRequestError(
            f"config path '{config_path}': an absolute path to a file in the pods, "
            f"e.g. {DEFAULT_CONFIG_PATH}"
        )


def render_configmap(
    config_text: str, *, name: str = DEFAULT_NAME, config_path: str = DEFAULT_CONFIG_PATH
) -> dict[str, Any]:
    """The ConfigMap holding experts.yaml as written (comments included)."""
    check_names(name, config_path)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(name), "labels": _labels(name)},
        "data": {PurePosixPath(config_path).name: config_text},
    }


def render_rayservice(
    config: PoolConfig,
    *,
    image: str,
    config_path: str = DEFAULT_CONFIG_PATH,
    name: str = DEFAULT_NAME,
    secret: str | None = None,
) -> dict[str, Any]:
    """The RayService (ray.io/v1) serving the pool; ``secret``: the Secret the pods take
    $COE_REDIS_URL and the other variables of ``secret_vars`` from (default NAME-secrets)."""
    check_names(name, config_path)
    if not image.strip():
        raise BadRequestError("image: empty; give the image with coe, vLLM and ray[serve]")
    pod = PodSettings(
        image=image,
        env=pod_env(config, config_path, secret or secret_name(name)),
        configmap=configmap_name(name),
        config_path=config_path,
    )
    groups = worker_groups(config)
    cluster: dict[str, Any] = {"rayVersion": RAY_VERSION}
    if any(g.min_replicas != g.max_replicas for g in groups):
        # Serve's autoscaling asks Ray for replicas; the in-tree autoscaler turns that into pods.
        cluster["enableInTreeAutoscaling"] = True
    cluster["headGroupSpec"] = head_group(config, pod)
    cluster["workerGroupSpecs"] = [worker_group_spec(g, pod) for g in groups]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            # KubeRay wants the Serve config as one YAML string.
            "serveConfigV2": dump_yaml(serve_config(config, config_path)),
            "rayClusterConfig": cluster,
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, experts.yaml) as literal blocks, readable as written;
    every pod's env spelt out rather than as a YAML alias of the first."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def render_manifest(
    config: PoolConfig,
    config_text: str,
    *,
    image: str,
    command: str,
    config_path: str = DEFAULT_CONFIG_PATH,
    name: str = DEFAULT_NAME,
    secret: str | None = None,
) -> str:
    """The ConfigMap and the RayService as one multi-document YAML file, after a header that
    says which ``command`` generated it and what the cluster needs besides."""
    configmap = render_configmap(config_text, name=name, config_path=config_path)
    service = render_rayservice(
        config, image=image, config_path=config_path, name=name, secret=secret
    )
    secret = secret or secret_name(name)
    needs = [
        f"#   {v.name}{'' if v.required else ' (optional)'}: {v.why}" for v in secret_vars(config)
    ]
    header = [
        f"# Generated by `{command}`:",
        "# edit experts.yaml, not this file, and run the command again.",
        "# Needs the KubeRay operator (ray.io/v1) and a Secret with these keys:",
        f"#   kubectl create secret generic {secret} --from-literal=KEY=VALUE ...",
        *needs,
    ]
    body = "---\n".join(dump_yaml(doc) for doc in (configmap, service))
    return "\n".join(header) + "\n---\n" + body
