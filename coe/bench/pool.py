"""`coe bench pool`: throughput of several experts sharing one slot.

One mixed stream of requests (seeded: each request's expert is drawn uniformly, arrivals are a
Poisson process) is served three ways on the same engine, in the same run:

- ``scheduler``: coe's grouped scheduler (requests for the resident expert run together, switches
  when its queue drains or another expert has waited past the bound);
- ``naive``: strict arrival order, a switch whenever the next request's expert differs;
- ``resident``: the same stream with every request sent to one expert, so nothing is swapped
  (the upper bound).

Every request decodes a fixed number of tokens (EOS ignored), so the figures compare. The
default load (128 requests at 16/s) exceeds what one slot serves (about 5 requests/s of 32
tokens on 2 CPU cores), so tokens/s measures capacity; at lower rates every mode keeps up with
arrivals and tokens/s mostly reflects the last requests' latency.
Every expert is loaded once before measuring: the figures are the steady state, with each
expert's weights in the host tier.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coe.cache.pool import EnginePool
from coe.config import parse_config
from coe.types import Message, Prompt, SamplingParams, collect

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
    "List some uses of copper.",
    "Why is the sky blue?",
]
GIB = 1 << 30


@dataclass
class ModeResult:
    mode: str
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    p50_latency_s: float
    p95_latency_s: float
    switches: int


@dataclass
class PoolBench:
    experts: int
    requests: int
    tokens_per_request: int
    arrival_rate_per_s: float
    max_wait_s: float
    modes: dict[str, ModeResult] = field(default_factory=dict)

    @property
    def vs_resident(self) -> float:
        return self.modes["scheduler"].tokens_per_s / self.modes["resident"].tokens_per_s

    @property
    def vs_naive(self) -> float:
        return self.modes["scheduler"].tokens_per_s / self.modes["naive"].tokens_per_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scheduler_vs_resident"] = round(self.vs_resident, 3)
        out["scheduler_vs_naive"] = round(self.vs_naive, 3)
        return out


def make_stream(experts: list[str], n: int, rate: float, seed: int) -> list[tuple[float, str, int]]:
    """(arrival offset in seconds, expert, prompt index) for each request."""
    rng = random.Random(seed)
    t = 0.0
    stream = []
    for i in range(n):
        stream.append((t, rng.choice(experts), i % len(PROMPTS)))
        t += rng.expovariate(rate)
    return stream


def pool_config(checkpoints: list[Path], max_wait_s: float, max_num_seqs: int) -> Any:
    experts = [
        {
            "name": f"expert{i}",
            "model": str(path),
            "prompt_format": "qa",
            "max_model_len": 1024,
            "vllm": {"cpu_kv_cache_gib": 1, "max_num_seqs": max_num_seqs},
        }
        for i, path in enumerate(checkpoints)
    ]
    slot = checkpoints[0].joinpath("model.safetensors").stat().st_size + GIB
    data = {
        "experts": experts,
        "categories": [{"name": "general", "expert": "expert0"}],
        "cache": {"hbm_bytes": int(slot * 1.5), "max_wait_s": max_wait_s},
    }
    return parse_config(data, checkpoints[0] / "bench-pool.yaml")


async def _serve(
    pool: EnginePool, stream: list[tuple[float, str, int]], tokens: int, mode: str
) -> ModeResult:
    group = next(iter(pool.groups.values()))
    group.scheduler.policy = "arrival" if mode == "naive" else "grouped"
    # Every mode starts from the same state: expert0 resident.
    hello = Prompt((Message("user", "Hi"),))
    await collect(pool.engine_for("expert0").stream(hello, SamplingParams(max_tokens=1)))
    switches_before = group.scheduler.switches
    sampling = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()

    async def one(offset: float, expert: str, index: int) -> tuple[float, int]:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        arrived = time.perf_counter()
        target = "expert0" if mode == "resident" else expert
        prompt = Prompt((Message("user", PROMPTS[index]),), "qa")
        done = await collect(pool.engine_for(target).stream(prompt, sampling))
        return time.perf_counter() - arrived, done.usage.completion_tokens

    results = await asyncio.gather(*(one(*r) for r in stream))
    seconds = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    produced = sum(r[1] for r in results)
    return ModeResult(
        mode=mode,
        requests=len(stream),
        tokens=produced,
        seconds=round(seconds, 2),
        tokens_per_s=round(produced / seconds, 1),
        p50_latency_s=round(statistics.median(latencies), 2),
        p95_latency_s=round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 2),
        switches=group.scheduler.switches - switches_before,
    )


async def run_pool_bench(
    checkpoints: list[Path],
    *,
    requests: int = 128,
    tokens: int = 32,
    rate: float = 16.0,
    max_wait_s: float = 2.0,
    max_num_seqs: int = 16,
    seed: int = 0,
) -> PoolBench:
    config = pool_config(checkpoints, max_wait_s, max_num_seqs)
    pool = EnginePool(config)
    names = [e.name for e in config.experts]
    stream = make_stream(names, requests, rate, seed)
    result = PoolBench(len(names), requests, tokens, rate, max_wait_s)
    try:
        await pool.start([names[0]])
        warm = SamplingParams(temperature=0.0, max_tokens=2)
        for name in names:  # each expert once: its engine-layout copy is in the host tier
            await collect(pool.engine_for(name).stream(Prompt((Message("user", "Hi"),)), warm))
        for mode in ("scheduler", "naive", "resident"):
            result.modes[mode] = await _serve(pool, stream, tokens, mode)
    finally:
        await pool.shutdown()
    return result
