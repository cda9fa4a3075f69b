"""A Ray cluster of processes on this machine, each node on a loopback address of its own.

For `coe serve --ray` without a cluster to join, and for the tests. Left to itself Ray resolves
"localhost" to the machine's external interface; here every node binds and advertises the
address it is given (127.0.0.2, 127.0.0.3, ...), and the cluster keeps its files (sockets,
logs, session) in a temporary folder of its own. ``shutdown`` stops exactly the processes this
cluster started, by their ids; it never runs `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from coe.errors import ConfigurationError


class ClusterStartError(ConfigurationError):
    """Ray is missing or would not start here."""


@dataclass(frozen=True)
class NodeSpec:
    ip: str
    num_cpus: float = 1
    resources: dict[str, float] = field(default_factory=dict)


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ClusterStartError(
            "Ray Serve is not installed: pip install -e '.[ray]' (ray[serve]; never ray[llm])"
        ) from None


class LocalCluster:
    def __init__(self, head: NodeSpec, *, temp_dir: str | None = None):
        require_ray()
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        # Short: Ray's Unix sockets live under it, and socket paths are limited to ~100 bytes.
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="coe-ray-", dir="/tmp")
        # Ray writes the address of "the current cluster" under $RAY_TMPDIR/ray: keep it ours.
        os.environ["RAY_TMPDIR"] = self.temp_dir
        os.makedirs(os.path.join(self.temp_dir, "ray"), exist_ok=True)
        self.head_ip = head.ip
        self._pids: set[int] = set()
        from ray.cluster_utils import Cluster

        self._cluster = Cluster(
            initialize_head=True,
            head_node_args=self._node_args(head, include_dashboard=False),
        )
        self._remember(self._cluster.head_node)

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    def _node_args(self, spec: NodeSpec, **extra: Any) -> dict[str, Any]:
        return {
            "node_ip_address": spec.ip,
            "num_cpus": spec.num_cpus,
            "resources": dict(spec.resources),
            "temp_dir": self.temp_dir,
            **extra,
        }

    def _remember(self, node: Any) -> None:
        for processes in node.all_processes.values():
            for info in processes:
                self._pids.add(info.process.pid)

    def add_node(self, spec: NodeSpec, wait: bool = True) -> Any:
        node = self._cluster.add_node(**self._node_args(spec))
        self._remember(node)
        if wait:
            self._cluster.wait_for_nodes()
        return node

    def kill_node(self, node: Any) -> None:
        """The node's processes die at once, as when a machine is lost: its Ray processes and
        everything they started (replica workers, their engines), not left to notice later
        that their raylet is gone."""
        doomed: set[int] = set()
        for processes in node.all_processes.values():
            for info in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process = psutil.Process(info.process.pid)
                    doomed.add(process.pid)
                    doomed.update(c.pid for c in process.children(recursive=True))
        self._cluster.remove_node(node, allow_graceful=False)
        for pid in _alive(doomed):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()

    def connect(self) -> None:
        import ray

        ray.init(address=self.address, _node_ip_address=self.head_ip, log_to_driver=False)

    def pids(self) -> set[int]:
        """Every live process this cluster started, with their children (workers, engines)."""
        found: set[int] = set()
        for pid in self._pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                found.add(pid)
                found.update(c.pid for c in process.children(recursive=True))
        return found

    def shutdown(self, timeout_s: float = 30.0) -> set[int]:
        """Stop Serve, disconnect, stop the nodes; kill what is left of ours. Returns the pids
        still alive after that (none, when all went well)."""
        import ray
        from ray import serve

        ours = self.pids()
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        self._cluster.shutdown()
        deadline = time.monotonic() + timeout_s
        alive = _alive(ours)
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = _alive(alive)
        for pid in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        time.sleep(0.5)
        left = _alive(alive)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
    return alive
