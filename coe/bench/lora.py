"""`coe bench lora`: what serving LoRA adapters as experts costs, beside the same experts as
merged full checkpoints swapped through the weight cache.

One LoRA engine on the prepared base model serves N seeded test adapters
(coe.models.adapters.prepared_adapter). In the same run, on the same engine:

- the base alone: a batch of greedy requests without an adapter (the reference);
- a mixed stream: the same number of requests spread round-robin over the N adapters
  (each stream twice, alternated, the better run kept);
- adapter switch from disk: time to first token of a request whose adapter is not loaded yet
  (vLLM reads it and fills a slot) beside one whose adapter is in a slot;
- adapter switch from host: the same for an adapter in vLLM's host cache but not in a slot.
  Requests go one at a time round-robin over one adapter more than there are slots, so each one
  finds its adapter evicted from the slots (LRU) but kept on the host (the two extra adapters are
  the first ones' folders under other ids: vLLM loads and caches them as separate adapters).
  Each switch is paired with the next request of the same adapter (now in its slot): the
  difference is the switch, the median is kept.

Then, with the LoRA engine shut down (one engine at a time), the same adapters' merged
checkpoints share one slot of the weight cache (coe.bench.merged_swap): the full-weight swap and
the same mixed stream's tokens/s. Ratios: full swap over adapter switch (target >= 50x), mixed
LoRA stream over the base alone (target >= 0.9 with 4 adapters), host adapter switch (target
<= 10 ms).

Tokens are decoded with ignore_eos, so every request produces the same count.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from coe.bench.merged_swap import run_merged_swap, stream_tok_s, ttft
from coe.engines.lora import AdapterRef, LoraOptions, adapter_id
from coe.engines.vllm_local import VllmLocalEngine, VllmOptions, VllmSpec
from coe.types import Chunk, Prompt, SamplingParams

TARGET_FULL_VS_ADAPTER = 50.0
TARGET_MIXED_VS_BASE = 0.9
TARGET_HOST_SWITCH_S = 0.010


@dataclass
class LoraBench:
    model: str
    adapters: int
    max_loras: int
    rank: int
    requests: int
    tokens_per_request: int
    engine_start_s: float
    base_tok_s: float
    mixed_tok_s: float
    mixed_vs_base: float
    base_ttft_s: float
    adapter_warm_ttft_s: float
    adapter_cold_ttft_s: float
    adapter_switch_s: float  # from disk: first use
    adapter_host_switch_s: float  # from vLLM's host cache into a slot, median
    adapter_host_switch_samples_s: list[float]
    # The same experts as merged full checkpoints in one slot of the weight cache.
    merged_slots: int
    merged_pool_start_s: float
    full_swap_s: float  # HOST -> HBM, median, measured like the adapter switch
    full_swap_samples_s: list[float]
    full_swap_cache_s: float  # the cache's own timing of those moves, mean
    merged_mixed_tok_s: float
    merged_resident_tok_s: float
    full_swap_vs_adapter_switch: float | None  # None: the adapter switch is below the noise
    lora_mixed_vs_merged_mixed: float
    # The LoRA engine's mixed stream over a plain engine of one merged expert (no LoRA layers):
    # what serving through a LoRA-enabled engine costs, beside the same engine's base alone.
    lora_mixed_vs_plain_engine: float
    targets: dict[str, bool]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 1) if b > 0 else None


async def run_lora_bench(
    adapters: int = 4,
    requests: int = 16,
    tokens: int = 32,
    max_loras: int | None = None,
    base_name: str = "gemma-3-270m",
    rounds: int = 3,
) -> LoraBench:
    from coe.models.adapters import prepared_adapter
    from coe.models.prepare import prepare_model

    base = prepare_model(base_name)
    # +1: the base's own requests carry a null adapter (coe.engines.lora) and take a slot.
    slots = max_loras or adapters + 1
    folders = await asyncio.to_thread(
        lambda: [prepared_adapter(seed, base_name) for seed in range(1, adapters + 1)]
    )
    refs: list[AdapterRef | None] = [
        AdapterRef(f"bench-{i}", adapter_id(f / "adapter"), str(f / "adapter"))
        for i, f in enumerate(folders)
    ]
    # One adapter more than the slots for the host-switch rotation: aliases of the first folders.
    aliases = [
        AdapterRef(f"bench-alias-{k}", adapter_id(f"{f}/adapter-alias-{k}"), str(f / "adapter"))
        for k, f in enumerate((folders * (slots + 1))[: slots + 1 - adapters])
    ]
    rotation = [r for r in refs if r is not None] + aliases
    lora = LoraOptions(max_loras=slots, max_rank=8, max_cpu_loras=len(rotation) + 1)
    options = VllmOptions(cpu_kv_cache_gib=1, max_num_seqs=max(requests, 8), lora=lora)
    engine = VllmLocalEngine("bench-lora", VllmSpec(str(base), "bfloat16", 1024, options))

    def with_adapter(ref: AdapterRef | None) -> Any:
        return lambda i, prompt, params: engine.stream(prompt, params, adapter=ref)

    def mixed(group: list[AdapterRef | None]) -> Any:
        def open_stream(i: int, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Chunk]:
            return engine.stream(prompt, params, adapter=group[i % len(group)])

        return open_stream

    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    try:
        await ttft(with_adapter(None), 0)  # warm-up (and the null adapter's first load)
        base_ttft = min([await ttft(with_adapter(None), 0) for _ in range(3)])
        cold = await ttft(with_adapter(refs[0]), 0)  # first use: read from disk into a slot
        warm = min([await ttft(with_adapter(refs[0]), 0) for _ in range(3)])
        for ref in refs[1:]:
            await ttft(with_adapter(ref), 0)  # load the others before timing the streams
        # Alternated, best of each: the machine may be shared, and the first stream warms up.
        base_runs, mixed_runs = [], []
        for _ in range(2):
            base_runs.append(await stream_tok_s(with_adapter(None), requests, tokens))
            mixed_runs.append(await stream_tok_s(mixed(refs), requests, tokens))
        base_tok_s, mixed_tok_s = max(base_runs), max(mixed_runs)
        for ref in rotation:  # every rotation adapter on the host (the aliases read from disk)
            await ttft(with_adapter(ref), 0)
        host_switches = []
        for _ in range(rounds):
            for ref in rotation:  # each finds itself evicted from the slots, kept on the host
                switched = await ttft(with_adapter(ref), 0)
                in_slot = await ttft(with_adapter(ref), 0)
                host_switches.append(switched - in_slot)
    finally:
        await engine.shutdown()
    host_switch = statistics.median(host_switches)

    merged = await run_merged_swap([f / "merged" for f in folders], requests, tokens)
    mixed_vs_base = mixed_tok_s / base_tok_s
    full_vs_adapter = _ratio(merged.full_swap_s, host_switch)
    return LoraBench(
        model=base_name,
        adapters=adapters,
        max_loras=slots,
        rank=8,
        requests=requests,
        tokens_per_request=tokens,
        engine_start_s=round(start_s, 2),
        base_tok_s=round(base_tok_s, 1),
        mixed_tok_s=round(mixed_tok_s, 1),
        mixed_vs_base=round(mixed_vs_base, 3),
        base_ttft_s=round(base_ttft, 4),
        adapter_warm_ttft_s=round(warm, 4),
        adapter_cold_ttft_s=round(cold, 4),
        adapter_switch_s=round(cold - warm, 4),
        adapter_host_switch_s=round(host_switch, 4),
        adapter_host_switch_samples_s=[round(s, 4) for s in host_switches],
        merged_slots=merged.slots,
        merged_pool_start_s=merged.pool_start_s,
        full_swap_s=merged.full_swap_s,
        full_swap_samples_s=merged.full_swap_samples_s,
        full_swap_cache_s=merged.cache_swap_s,
        merged_mixed_tok_s=merged.mixed_tok_s,
        merged_resident_tok_s=merged.resident_tok_s,
        full_swap_vs_adapter_switch=full_vs_adapter,
        lora_mixed_vs_merged_mixed=round(mixed_tok_s / merged.mixed_tok_s, 2),
        lora_mixed_vs_plain_engine=round(mixed_tok_s / merged.resident_tok_s, 3),
        targets={
            f"full swap >= {TARGET_FULL_VS_ADAPTER:g}x an adapter switch": full_vs_adapter
            is not None
            and full_vs_adapter >= TARGET_FULL_VS_ADAPTER,
            f"mixed LoRA stream >= {TARGET_MIXED_VS_BASE:g}x the base alone": mixed_vs_base
            >= TARGET_MIXED_VS_BASE,
            f"host adapter switch <= {TARGET_HOST_SWITCH_S * 1000:g} ms": host_switch
            <= TARGET_HOST_SWITCH_S,
        },
    )
