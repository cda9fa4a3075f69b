"""`coe bench engine`: what one expert engine costs to start and how fast it decodes.

Reference, measured in the same run on the same model: plain Hugging Face transformers
(load time, and single-stream greedy decoding with `generate`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from coe.cache.pool import engine_key
from coe.config import PoolConfig
from coe.engines.vllm_local import VllmLocalEngine, VllmSpec
from coe.types import Message, Prompt, SamplingParams, collect

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
]


@dataclass
class EngineBench:
    expert: str
    model: str
    tokens_per_request: int
    batch: int
    engine_start_s: float
    ttft_s: float
    single_stream_tok_s: float
    batched_tok_s: float
    reference_load_s: float
    reference_single_stream_tok_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _vllm_figures(
    engine: VllmLocalEngine, tokens: int, batch: int
) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    def prompt(i: int) -> Prompt:
        return Prompt((Message("user", PROMPTS[i % len(PROMPTS)]),), format="chat")

    await collect(engine.stream(prompt(0), SamplingParams(temperature=0.0, max_tokens=4)))  # warm
    t0 = time.perf_counter()
    ttft = None
    produced = 0
    async for chunk in engine.stream(prompt(1), params):
        if ttft is None and chunk.text:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            produced = chunk.usage.completion_tokens
    single = produced / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    done = await asyncio.gather(*(collect(engine.stream(prompt(i), params)) for i in range(batch)))
    batched = sum(d.usage.completion_tokens for d in done) / (time.perf_counter() - t0)
    return start_s, ttft or 0.0, single, batched


def _transformers_reference(model_dir: str, tokens: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    produced = out.shape[1] - ids.shape[1]
    return load_s, produced / (time.perf_counter() - t0)


async def run_engine_bench(config: PoolConfig, expert: str, tokens: int, batch: int) -> EngineBench:
    spec = engine_key(config, config.expert(expert))
    if not isinstance(spec, VllmSpec):
        raise ValueError(f"expert {expert} is not served by a local vLLM engine")
    engine = VllmLocalEngine(f"bench-{expert}", spec)
    try:
        start_s, ttft, single, batched = await _vllm_figures(engine, tokens, batch)
    finally:
        await engine.shutdown()
    ref_load, ref_single = await asyncio.to_thread(_transformers_reference, spec.model, tokens)
    return EngineBench(
        expert=expert,
        model=spec.model,
        tokens_per_request=tokens,
        batch=batch,
        engine_start_s=round(start_s, 2),
        ttft_s=round(ttft, 4),
        single_stream_tok_s=round(single, 1),
        batched_tok_s=round(batched, 1),
        reference_load_s=round(ref_load, 2),
        reference_single_stream_tok_s=round(ref_single, 1),
    )
