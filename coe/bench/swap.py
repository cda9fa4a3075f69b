"""`coe bench swap`: what it costs to make an expert resident, by the tier it comes from.

All figures come from one run on one engine, for one expert (a seeded variant of the prepared
model, so the swap really changes the weights):

- engine cold start: what a swap would cost without the cache (a fresh engine for the expert,
  started from the expert's own checkpoint);
- DISK → HBM: vLLM reloading the base model straight from its checkpoint folder into that engine;
- DISK → HOST: reading the expert's checkpoint into host RAM (page cache dropped where the kernel
  allows);
- HOST → HBM, checkpoint layout: vLLM ``reload_weights`` from those tensors (the first swap-in);
- HOST → HBM, engine layout: the captured copy (every later swap-in), median of several;
- the floor: a plain copy of the same bytes in the engine's worker process (pinned host → device
  bandwidth on CUDA, memcpy otherwise).

The engine started for the cold-start figure is also the reference: its greedy answer, from the
expert's checkpoint loaded directly, is what the swapped-in expert must answer, after its first
swap-in and after all the swaps. The base model's answer must differ from it, or the comparison
could not tell the two weights apart.
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
    # The swapped-in expert's greedy answers (after its first swap-in and after the last swap)
    # equal the reference: a fresh engine that loaded the expert's checkpoint directly.
    answers_match: bool
    answers_compared: str  # what was compared with what, in words
    reference_answer: str
    swapped_answers: list[str]  # after the first swap-in, after the last swap
    base_answer_differs: bool  # the base model answers the probe otherwise: the check can fail

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
    # Started from the expert's checkpoint: the cold start a swap saves, and the reference.
    spec = VllmSpec(
        str(variant), "bfloat16", 1024, options, worker_extension=BENCH_WORKER_EXTENSION
    )
    engine = VllmLocalEngine("bench-swap", spec)
    worker = BenchWorkerClient(engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)

    async def answer() -> str:
        await engine.reset_prefix_cache()  # no KV computed with other weights
        return (await collect(engine.stream(PROBE, greedy))).text

    try:
        t0 = time.perf_counter()
        await engine.start()
        cold_start = time.perf_counter() - t0
        reference = await answer()

        for f in checkpoint_files(str(base)):
            drop_page_cache(str(f))
        disk = await worker.load_path(str(base))
        base_answer = await answer()
        await worker.capture("base")

        dropped = all(drop_page_cache(str(f)) for f in checkpoint_files(str(variant)))
        await worker.stage("variant", str(variant), drop_cache=True)
        staged = await _wait_staged(worker, "variant")
        if staged["state"] != "staged":
            raise RuntimeError(f"reading {variant} failed: {staged}")

        first = await worker.activate("variant")
        first_answer = await answer()
        captured = await worker.capture("variant")

        samples: list[float] = []
        last: Mapping[str, Any] = {}
        for _ in range(repeats):
            for unit in ("base", "variant"):
                last = await worker.activate(unit)
                if unit == "variant":
                    samples.append(last["seconds"])
        last_answer = await answer()

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
        answers_match=first_answer == reference and last_answer == reference,
        answers_compared=(
            f"{variant.name} swapped into an engine of {base.name}, after its first swap-in and "
            f"after {repeats} HOST → HBM swaps, vs. a fresh engine started from {variant}"
        ),
        reference_answer=reference,
        swapped_answers=[first_answer, last_answer],
        base_answer_differs=base_answer != reference,
    )
