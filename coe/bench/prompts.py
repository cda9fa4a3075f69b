"""`coe bench prompts`: the latency each prompt strategy adds to a request, beside routing's.

Each prompt is routed first (its embedding computed once, as in serving), then shaped by each
strategy: a static identity, a mixture-of-prompts region lookup (regions fitted at the start of
the run on the router's training prompts of three categories), and a generated identity, written by
the pool's writer expert on a cache miss and read from the store on a hit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coe.bench.report import percentile_ms, print_table
from coe.config import PoolConfig
from coe.orchestrator import Orchestrator
from coe.prompts.mixture import Demo, fit_mixture
from coe.runtime import BackgroundLoop
from coe.types import Message

TARGET_MS = 2.0
MIXTURE_CATEGORY = "math"
DEMO_CATEGORIES = ("math", "coding", "writing")
# Candidate instructions for the benchmark's regions (ours; any category's would do).
CANDIDATES = (
    "Solve the problem step by step and give the final number.",
    "Set up the equation first, then solve it and check the result.",
    "Explain the idea behind the method before the computation.",
)


@dataclass
class PromptsBench:
    prompts: int
    routing_p50_ms: float
    static_p50_ms: float
    static_p99_ms: float
    mixture_p50_ms: float
    mixture_p99_ms: float
    mixture_regions: int
    generated_miss_p50_ms: float
    generated_hit_p50_ms: float
    generated_hit_p99_ms: float
    generated_prompts: int
    target_ms: float = TARGET_MS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def print_table(self) -> None:
        target = f"target <= {self.target_ms}"
        print_table(
            f"prompt strategies: added latency per request ({self.prompts} prompts)",
            ("strategy", "p50 ms", "p99 ms", "note"),
            [
                ("routing (reference)", f"{self.routing_p50_ms}", "", "embedding + classifier"),
                ("expert-prompting, static", f"{self.static_p50_ms}", f"{self.static_p99_ms}",
                 target),
                ("mixture-of-prompts lookup", f"{self.mixture_p50_ms}", f"{self.mixture_p99_ms}",
                 f"{self.mixture_regions} regions; {target}"),
                ("expert-prompting, generated (miss)", f"{self.generated_miss_p50_ms}", "",
                 f"an LLM call; {self.generated_prompts} prompts"),
                ("expert-prompting, generated (hit)", f"{self.generated_hit_p50_ms}",
                 f"{self.generated_hit_p99_ms}", f"from the store; {target}"),
            ],
        )  # fmt: skip


def training_prompts(config: PoolConfig) -> list[dict[str, str]]:
    """The router's own training prompts (never the evaluation sets): its folder's prompt
    sheets (data/), or a train.jsonl beside router.json."""
    from coe.router.data import read_labelled
    from coe.router.router import router_dir

    folder = router_dir(config)
    path = folder / "data" if (folder / "data").is_dir() else folder / "train.jsonl"
    return [{"prompt": r.prompt, "category": r.category} for r in read_labelled(path)]


def run_prompts_bench(
    config: PoolConfig,
    router: Any,
    runner: BackgroundLoop,
    prompts: int,
    generated: int,
    work: Path,
) -> PromptsBench:
    rows = training_prompts(config)
    # Demos of three kinds of task, so that the regions have something to separate.
    demos = [Demo(r["prompt"], "") for r in rows if r["category"] in DEMO_CATEGORIES]
    folder = work / MIXTURE_CATEGORY
    # The benchmark's pool: the configured one, with the mixture category using the regions.
    categories = []
    for c in config.categories:
        if c.name == MIXTURE_CATEGORY:
            c = c.model_copy(update={"strategy": "mixture_of_prompts", "prompts": str(folder)})
        categories.append(c)
    writer = config.strategies.expert_prompting.model_copy(update={"mode": "generated",
                                                                    "budget_s": 600.0})  # fmt: skip
    strategies = config.strategies.model_copy(update={"expert_prompting": writer})
    pool = config.model_copy(update={"categories": categories, "strategies": strategies})
    orch = Orchestrator(pool, router=router)
    fit_mixture(MIXTURE_CATEGORY, demos, CANDIDATES, orch.embedder(), seed=0).save(folder)
    orch.strategies.check()
    identities = [c.name for c in pool.categories if c.strategy == "expert_prompting"]
    if not identities or MIXTURE_CATEGORY not in pool.category_names:
        raise ValueError(
            f"the benchmark needs a category {MIXTURE_CATEGORY!r} and one with "
            "strategy expert_prompting (the default pool has both)"
        )
    static_category = identities[0]

    sample = [r["prompt"] for r in rows[:: max(1, len(rows) // prompts)]][:prompts]
    routing, static, mixture = [], [], []
    for text in sample:
        messages = [Message("user", text)]
        t0 = time.perf_counter()
        orch.route(messages)
        routing.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        orch.strategies.describe(static_category, messages)
        static.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        orch.strategies.describe(MIXTURE_CATEGORY, messages)
        mixture.append(time.perf_counter() - t0)

    runner.run(orch.start([orch.identity_writer]))
    try:
        misses, hits = [], []
        for text in sample[:generated]:
            for out in (misses, hits):
                messages = [Message("user", text)]
                t0 = time.perf_counter()
                runner.run(orch.strategies.shape(static_category, messages))
                out.append(time.perf_counter() - t0)
    finally:
        runner.run(orch.close())
    return PromptsBench(
        prompts=len(sample),
        routing_p50_ms=round(1000 * statistics.median(routing), 3),
        static_p50_ms=percentile_ms(static, 0.5),
        static_p99_ms=percentile_ms(static, 0.99),
        mixture_p50_ms=percentile_ms(mixture, 0.5),
        mixture_p99_ms=percentile_ms(mixture, 0.99),
        mixture_regions=orch.strategies.mixture(pool.category(MIXTURE_CATEGORY)).regions,
        generated_miss_p50_ms=percentile_ms(misses, 0.5),
        generated_hit_p50_ms=percentile_ms(hits, 0.5),
        generated_hit_p99_ms=percentile_ms(hits, 0.99),
        generated_prompts=len(misses),
    )
