"""The slot worker as the cache benchmarks run it: `coe.cache.worker.SlotWorker` plus the
copy floor they print each figure beside, which serving never asks for."""

from __future__ import annotations

import time
from typing import TypedDict, cast

import torch

from coe.cache.host_memory import host_buffer
from coe.cache.rpc import WorkerClient
from coe.cache.worker import SlotWorker

# The worker extension `coe bench swap` starts its engine with (serving uses SlotWorker's).
BENCH_WORKER_EXTENSION = "coe.bench.worker.BenchWorker"


class CopyFloor(TypedDict):
    bytes: int
    seconds: float
    kind: str


class BenchWorker(SlotWorker):
    """Mixed into vLLM's Worker by `coe bench swap`; `coe bench host-copy` uses it bare."""

    def coe_memcpy_floor(self, nbytes: int, repeats: int = 3) -> CopyFloor:
        """The copy floor for `nbytes` in this process: the best of a few plain copies, host to
        HBM from pinned memory on CUDA, RAM to RAM otherwise."""
        cuda = torch.cuda.is_available()
        source = host_buffer(nbytes, pin=cuda)  # the host tier's own kind of memory
        source.fill_(1)
        target = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")
        target.fill_(0)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            target.copy_(source, non_blocking=cuda)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        kind = "pinned host->device" if cuda else "memcpy"
        return {"bytes": nbytes, "seconds": best, "kind": kind}


class BenchWorkerClient(WorkerClient):
    """WorkerClient for an engine started with BENCH_WORKER_EXTENSION."""

    async def memcpy_floor(self, nbytes: int) -> CopyFloor:
        return cast(CopyFloor, await self.call("coe_memcpy_floor", nbytes))
