"""`coe bench lora`: what serving LoRA adapters as experts costs on one engine.

One LoRA engine on the prepared base model serves N seeded test adapters
(coe.models.adapters.prepared_adapter). In the same run, on the same engine:

- the base alone: a batch of greedy requests without an adapter (the reference);
- a mixed stream: the same number of requests spread round-robin over the N adapters
  (each stream twice, alternated, the better run kept);
- adapter switch: time to first token of a request whose adapter is not loaded yet (vLLM reads
  it from disk and fills a slot) beside one whose adapter is loaded, and the base's.

Tokens are decoded with ignore_eos, so every request produces the same count.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from coe.engines.lora import AdapterRef, LoraOptions, adapter_id
from coe.engines.vllm_local import VllmLocalEngine, VllmOptions, VllmSpec
from coe.types import Message, Prompt, SamplingParams

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
)


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
    adapter_switch_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt(i: int) -> Prompt:
    return Prompt((Message("user", PROMPTS[i % len(PROMPTS)]),), format="qa")


async def _ttft(engine: VllmLocalEngine, adapter: AdapterRef | None) -> float:
    t0 = time.perf_counter()
    async for chunk in engine.stream(
        _prompt(0), SamplingParams(temperature=0.0, max_tokens=1), adapter=adapter
    ):
        if chunk.text or chunk.finish_reason:
            break
    return time.perf_counter() - t0


async def _stream_tok_s(
    engine: VllmLocalEngine, adapters: list[AdapterRef | None], requests: int, tokens: int
) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    async def one(i: int) -> int:
        produced = 0
        adapter = adapters[i % len(adapters)]
        async for chunk in engine.stream(_prompt(i), params, adapter=adapter):
            if chunk.usage is not None:
                produced = chunk.usage.completion_tokens
        return produced

    t0 = time.perf_counter()
    produced = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    return produced / (time.perf_counter() - t0)


async def run_lora_bench(
    adapters: int = 3,
    requests: int = 12,
    tokens: int = 32,
    max_loras: int | None = None,
    base_name: str = "gemma-3-270m",
) -> LoraBench:
    from coe.models.adapters import prepared_adapter
    from coe.models.prepare import prepare_model

    base = prepare_model(base_name)
    # +1: the base's own requests carry a null adapter (coe.engines.lora) and take a slot.
    slots = max_loras or adapters + 1
    folders = await asyncio.to_thread(
        lambda: [prepared_adapter(seed, base_name) / "adapter" for seed in range(1, adapters + 1)]
    )
    refs: list[AdapterRef | None] = [
        AdapterRef(f"bench-{i}", adapter_id(f), str(f)) for i, f in enumerate(folders)
    ]
    lora = LoraOptions(max_loras=slots, max_rank=8, max_cpu_loras=max(slots, adapters + 1))
    options = VllmOptions(cpu_kv_cache_gib=1, max_num_seqs=max(requests, 8), lora=lora)
    engine = VllmLocalEngine("bench-lora", VllmSpec(str(base), "bfloat16", 1024, options))
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    try:
        await _ttft(engine, None)  # warm-up (and the null adapter's first load)
        base_ttft = min([await _ttft(engine, None) for _ in range(3)])
        cold = await _ttft(engine, refs[0])  # first use: read from disk into a slot
        warm = min([await _ttft(engine, refs[0]) for _ in range(3)])
        for ref in refs[1:]:
            await _ttft(engine, ref)  # load the others before timing the streams
        # Alternated, best of each: the machine may be shared, and the first stream warms up.
        base_runs, mixed_runs = [], []
        for _ in range(2):
            base_runs.append(await _stream_tok_s(engine, [None], requests, tokens))
            mixed_runs.append(await _stream_tok_s(engine, refs, requests, tokens))
        base_tok_s, mixed_tok_s = max(base_runs), max(mixed_runs)
    finally:
        await engine.shutdown()
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
        mixed_vs_base=round(mixed_tok_s / base_tok_s, 3),
        base_ttft_s=round(base_ttft, 4),
        adapter_warm_ttft_s=round(warm, 4),
        adapter_cold_ttft_s=round(cold, 4),
        adapter_switch_s=round(cold - warm, 4),
    )
