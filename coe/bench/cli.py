"""`coe bench cli`: the wall time of `coe ask` as a user runs it (a new process each time),
against a running pool (`coe up`) and with the pool started in-process (`coe ask --local`),
measured in one run.

Each ask is a subprocess of this Python, wall-clocked from spawn to exit: interpreter start,
imports, the request and the answer's printing, the engine's generation included. Each remote ask
has its own prompt, so none is answered from the gateway's response cache (the in-process path
has none). A pool already running for the experts.yaml is used and left running; otherwise the
benchmark starts one with `coe up` and stops it (`coe down`) before the in-process asks, so the
two never share the machine's cores.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coe.bench.report import print_table
from coe.errors import UnavailableError

PROMPT = "Name the largest planet in the solar system. (question {n})"
TARGET_REMOTE_WALL_S = 1.5


@dataclass
class AskRun:
    wall_s: float
    request_s: float  # what `coe ask --json` reports as latency_s: the request alone
    completion_tokens: int
    expert: str


@dataclass
class CliBench:
    config: str
    max_tokens: int
    pool_was_running: bool
    pool_start_s: float | None  # `coe up`'s wall time, when this run started the pool
    remote: list[AskRun]
    local: list[AskRun]

    @property
    def remote_wall_p50_s(self) -> float:
        return statistics.median(r.wall_s for r in self.remote)

    @property
    def local_wall_p50_s(self) -> float:
        return statistics.median(r.wall_s for r in self.local)

    def as_dict(self) -> dict[str, Any]:
        remote = self.remote_wall_p50_s
        local = self.local_wall_p50_s
        return {
            "config": self.config,
            "max_tokens": self.max_tokens,
            "pool_was_running": self.pool_was_running,
            "pool_start_s": self.pool_start_s,
            "remote_asks": len(self.remote),
            "remote_wall_p50_s": round(remote, 3),
            "remote_wall_min_s": round(min(r.wall_s for r in self.remote), 3),
            "remote_wall_max_s": round(max(r.wall_s for r in self.remote), 3),
            "remote_request_p50_s": round(statistics.median(r.request_s for r in self.remote), 3),
            "local_asks": len(self.local),
            "local_wall_p50_s": round(local, 3),
            "local_request_p50_s": round(statistics.median(r.request_s for r in self.local), 3),
            "speedup": round(local / remote, 1),
            "targets": {"remote_wall_le_1_5s": remote <= TARGET_REMOTE_WALL_S},
            "runs": {
                "remote": [asdict(r) for r in self.remote],
                "local": [asdict(r) for r in self.local],
            },
        }

    def print_table(self) -> None:
        d = self.as_dict()
        rows = [
            ("coe ask (running pool)", str(d["remote_asks"]), f"{d['remote_wall_p50_s']:.2f}",
             f"{d['remote_request_p50_s']:.2f}"),
            ("coe ask --local", str(d["local_asks"]), f"{d['local_wall_p50_s']:.2f}",
             f"{d['local_request_p50_s']:.2f}"),
        ]  # fmt: skip
        print_table(
            f"coe ask wall time, {self.max_tokens} tokens at most",
            ("path", "asks", "wall p50 (s)", "request p50 (s)"),
            rows,
        )
        ok = d["targets"]["remote_wall_le_1_5s"]
        started = (
            "a pool already running"
            if self.pool_was_running
            else f"`coe up` took {self.pool_start_s:.1f} s"
        )
        print(
            f"running pool {d['speedup']}x faster than in-process; target <= "
            f"{TARGET_REMOTE_WALL_S} s: {'met' if ok else 'MISSED'} ({started})"
        )


def _coe(config: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "coe.cli", "--config", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def _ask(config: Path, n: int, max_tokens: int, local: bool) -> AskRun:
    args = ["ask", "--json", "--temperature", "0", "--max-tokens", str(max_tokens)]
    if local:
        args.append("--local")
    t0 = time.perf_counter()
    run = _coe(config, *args, PROMPT.format(n=n), timeout_s=900)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise UnavailableError(f"coe ask{' --local' if local else ''} failed: {run.stderr[-2000:]}")
    out = json.loads(run.stdout)
    return AskRun(wall, out["latency_s"], out["usage"]["completion_tokens"], out["expert"])


def pool_running(config: Path) -> bool:
    return _coe(config, "status", timeout_s=60).returncode == 0


def run_cli_bench(config: Path, repeats: int, local_repeats: int, max_tokens: int) -> CliBench:
    was_running = pool_running(config)
    start_s = None
    if not was_running:
        t0 = time.perf_counter()
        up = _coe(config, "up", timeout_s=1200)
        if up.returncode != 0:
            raise UnavailableError(f"coe up failed: {up.stderr[-2000:]}")
        start_s = round(time.perf_counter() - t0, 1)
    try:
        _ask(config, 0, max_tokens, local=False)  # warm: the page cache, the engine's first run
        remote = [_ask(config, n, max_tokens, local=False) for n in range(1, repeats + 1)]
    finally:
        if not was_running:
            _coe(config, "down", timeout_s=120)
    local = [_ask(config, n, max_tokens, local=True) for n in range(1, local_repeats + 1)]
    return CliBench(str(config), max_tokens, was_running, start_s, remote, local)
