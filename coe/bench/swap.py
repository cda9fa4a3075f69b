"""`coe bench swap`: what it costs to make an expert resident, by the tier it comes from.

All figures come from one run on one engine, for one expert (a seeded variant of the prepared
model, so the swap really changes the weights):

- engine cold start: what a swap would cost without the cache (a fresh engine for the expert);
- DISK → HOST: reading the checkpoint into host RAM (page cache dropped where the kernel allows);
- HOST → HBM, checkpoint layout: vLLM ``reload_weights`` from those tensors (the first swap-in);
- HOST → HBM, engine layout: the captured copy (every later swap-in), median of several;
- DISK → HBM: vLLM reloading straight from the checkpoint folder;
- the floor: a plain copy of the same bytes in the engine's worker process (pinned host → device
  bandwidth on CUDA, memcpy otherwise).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coe.bench.worker import BENCH_WORKER_EXTENSION, BenchWorkerClient
from coe.cache.checkpoint import checkpoint_bytes, checkpoint_files, drop_page_cache
from coe.cache.rpc import StageState
from coe.engines.vllm_local import VllmLocalEngine, VllmOptions, VllmSpec
from coe.types import Message, Prompt, SamplingParams, collect

PROBE = Prompt((Message("user", "Name three primary colors."),), "qa")


@dataclass
class SwapBench:
    device: str
    checkpoint_bytes: int
    engine_layout_bytes: int
    copied_bytes: int
    rebound_linears: int
    engine_cold_start_s: float
    disk_to_host_s: float
    page_cache: str
    host_to_hbm_checkpoint_layout_s: float
    host_to_hbm_s: float  # engine layout, median
    host_to_hbm_samples_s: list[float]
    disk_to_hbm_s: float
    floor_kind: str
    floor_checkpoint_bytes_s: float
    floor_copied_bytes_s: float
    effective_gb_s: float  # checkpoint bytes per second of a HOST → HBM swap
    swap_vs_floor: float  # HOST → HBM swap over the floor for the checkpoint's bytes
    cold_start_vs_swap: float
    answers_match: bool  # greedy answer after swaps equals the one after the first load

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _wait_staged(worker: BenchWorkerClient, unit: str) -> StageState:
    while True:
        state = await worker.wait_staged(unit, 0.0)
        if state["state"] != "loading":
            return state
        await asyncio.sleep(0.01)


async def run_swap_bench(
    base: Path, variant: Path, options: VllmOptions, repeats: int = 7
) -> SwapBench:
    spec = VllmSpec(str(base), "bfloat16", 1024, options, worker_extension=BENCH_WORKER_EXTENSION)
    engine = VllmLocalEngine("bench-swap", spec)
    worker = BenchWorkerClient(engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    try:
        t0 = time.perf_counter()
        await engine.start()
        cold_start = time.perf_counter() - t0
        await worker.capture("base")

        dropped = all(drop_page_cache(str(f)) for f in checkpoint_files(str(variant)))
        await worker.stage("variant", str(variant), drop_cache=True)
        staged = await _wait_staged(worker, "variant")
        if staged["state"] != "staged":
            raise RuntimeError(f"reading {variant} failed: {staged}")

        first = await worker.activate("variant")
        await engine.reset_prefix_cache()
        first_answer = (await collect(engine.stream(PROBE, greedy))).text
        captured = await worker.capture("variant")

        samples: list[float] = []
        last: Mapping[str, Any] = {}
        for _ in range(repeats):
            for unit in ("base", "variant"):
                last = await worker.activate(unit)
                if unit == "variant":
                    samples.append(last["seconds"])
        await engine.reset_prefix_cache()
        answers_match = (await collect(engine.stream(PROBE, greedy))).text == first_answer

        for f in checkpoint_files(str(base)):
            drop_page_cache(str(f))
        disk = await worker.load_path(str(base))

        nbytes = checkpoint_bytes(variant)
        floor = await worker.memcpy_floor(nbytes)
        floor_copied = await worker.memcpy_floor(last["copied_bytes"])
    finally:
        await engine.shutdown()
    swap = statistics.median(samples)
    return SwapBench(
        device="cuda" if floor["kind"].startswith("pinned") else "cpu",
        checkpoint_bytes=nbytes,
        engine_layout_bytes=captured["bytes"],
        copied_bytes=last["copied_bytes"],
        rebound_linears=last["rebound_linears"],
        engine_cold_start_s=round(cold_start, 2),
        disk_to_host_s=round(staged["seconds"], 3),
        page_cache="dropped (posix_fadvise)" if dropped else "warm (could not drop)",
        host_to_hbm_checkpoint_layout_s=round(first["seconds"], 3),
        host_to_hbm_s=round(swap, 4),
        host_to_hbm_samples_s=[round(s, 4) for s in samples],
        disk_to_hbm_s=round(disk["seconds"], 3),
        floor_kind=floor["kind"],
        floor_checkpoint_bytes_s=round(floor["seconds"], 4),
        floor_copied_bytes_s=round(floor_copied["seconds"], 4),
        effective_gb_s=round(nbytes / swap / 1e9, 2),
        swap_vs_floor=round(swap / floor["seconds"], 2),
        cold_start_vs_swap=round(cold_start / swap, 1),
        answers_match=answers_match,
    )
