"""The reference for `coe bench lora`: the same experts as merged full checkpoints, served the
way coe serves full checkpoints that share one slot: one engine whose weights the weight cache
swaps (coe.cache; every checkpoint's engine-layout copy in the host tier, so each switch is a
HOST -> HBM swap).

Measured on that pool:

- full-weight swap: time to first token of a request whose expert is not resident, minus that of
  the same expert's next request (resident), per switch; the median. Beside it, the cache's own
  timing of the same moves (coe_weight_move_seconds, host -> hbm);
- the same mixed stream as the adapters' (round-robin over the experts), tokens/s;
- the resident reference: the same number of requests all to one expert (nothing swapped).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coe.cache.checkpoint import checkpoint_bytes
from coe.cache.pool import EnginePool
from coe.config import parse_config
from coe.types import Chunk, Message, Prompt, SamplingParams

GIB = 1 << 30
PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
)

Opener = Callable[[int, Prompt, SamplingParams], AsyncIterator[Chunk]]


def bench_prompt(i: int) -> Prompt:
    return Prompt((Message("user", PROMPTS[i % len(PROMPTS)]),), format="qa")


async def ttft(open_stream: Opener, i: int) -> float:
    """Seconds to the first token of request `i` (one token, greedy)."""
    t0 = time.perf_counter()
    async for chunk in open_stream(i, bench_prompt(0), SamplingParams(temperature=0, max_tokens=1)):
        if chunk.text or chunk.finish_reason:
            break
    return time.perf_counter() - t0


async def stream_tok_s(open_stream: Opener, requests: int, tokens: int) -> float:
    """Tokens/s of `requests` concurrent greedy requests of `tokens` tokens each (EOS ignored,
    so every request produces the same count); request i is `open_stream(i, ...)`."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    async def one(i: int) -> int:
        produced = 0
        async for chunk in open_stream(i, bench_prompt(i), params):
            if chunk.usage is not None:
                produced = chunk.usage.completion_tokens
        return produced

    t0 = time.perf_counter()
    produced = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    return produced / (time.perf_counter() - t0)


@dataclass
class MergedSwap:
    experts: int
    slots: int
    pool_start_s: float
    full_swap_s: float  # median switch: TTFT after a swap minus TTFT resident
    full_swap_samples_s: list[float]
    cache_swap_s: float  # the cache's own mean HOST -> HBM move time over the same switches
    mixed_tok_s: float
    resident_tok_s: float


def _move_seconds() -> tuple[float, float]:
    """(sum, count) of the cache's HOST -> HBM moves so far (process-wide histogram)."""
    from prometheus_client import REGISTRY

    labels = {"from_tier": "host", "to_tier": "hbm"}
    total = REGISTRY.get_sample_value("coe_weight_move_seconds_sum", labels) or 0.0
    count = REGISTRY.get_sample_value("coe_weight_move_seconds_count", labels) or 0.0
    return total, count


def merged_pool_config(checkpoints: list[Path], max_num_seqs: int) -> Any:
    """One slot group (same architecture, one slot's worth of hbm_bytes) for the checkpoints,
    served at bfloat16 like the LoRA engine."""
    experts = [
        {
            "name": f"merged{i}",
            "model": str(path),
            "dtype": "bfloat16",
            "prompt_format": "qa",
            "max_model_len": 1024,
            "vllm": {"cpu_kv_cache_gib": 1, "max_num_seqs": max_num_seqs},
        }
        for i, path in enumerate(checkpoints)
    ]
    slot = max(checkpoint_bytes(p) for p in checkpoints) + GIB
    data = {
        "experts": experts,
        "categories": [{"name": "general", "expert": "merged0"}],
        "cache": {"hbm_bytes": int(slot * 1.5)},  # room for one slot, not two
    }
    return parse_config(data, checkpoints[0].parent / "bench-lora-merged.yaml")


async def run_merged_swap(
    checkpoints: list[Path], requests: int, tokens: int, rounds: int = 2
) -> MergedSwap:
    config = merged_pool_config(checkpoints, max(requests, 8))
    pool = EnginePool(config)
    names = [e.name for e in config.experts]

    def expert_stream(name: str) -> Opener:
        return lambda i, prompt, params: pool.engine_for(name).stream(prompt, params)

    def mixed(i: int, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Chunk]:
        return pool.engine_for(names[i % len(names)]).stream(prompt, params)

    try:
        t0 = time.perf_counter()
        await pool.start([names[0]])
        start_s = time.perf_counter() - t0
        slots = sum(len(g.slots) for g in pool.groups.values())
        if len(pool.groups) != 1 or slots != 1:
            raise RuntimeError(
                f"the merged checkpoints should share one slot; got {len(pool.groups)} groups, "
                f"{slots} slots"
            )
        for name in names:  # each once: its engine-layout copy is in the host tier
            await ttft(expert_stream(name), 0)
        samples: list[float] = []
        before = _move_seconds()
        for _ in range(rounds):
            for name in names[1:] + names[:1]:  # every request switches the slot
                swapped = await ttft(expert_stream(name), 0)
                resident = await ttft(expert_stream(name), 0)
                samples.append(swapped - resident)
        after = _move_seconds()
        moves = after[1] - before[1]
        cache_swap = (after[0] - before[0]) / moves if moves else float("nan")
        mixed_runs, resident_runs = [], []
        for _ in range(2):  # alternated, best of each: the machine may be shared
            mixed_runs.append(await stream_tok_s(mixed, requests, tokens))
            resident_runs.append(await stream_tok_s(expert_stream(names[0]), requests, tokens))
    finally:
        await pool.shutdown()
    return MergedSwap(
        experts=len(names),
        slots=slots,
        pool_start_s=round(start_s, 2),
        full_swap_s=round(statistics.median(samples), 4),
        full_swap_samples_s=[round(s, 4) for s in samples],
        cache_swap_s=round(cache_swap, 4),
        mixed_tok_s=round(max(mixed_runs), 1),
        resident_tok_s=round(max(resident_runs), 1),
    )
