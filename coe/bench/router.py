"""`coe bench router`: routing latency and throughput, beside plain sentence-transformers.

Both paths run the same classifier; they differ in how the prompt is embedded: the router's own
embedder (by default int8 ONNX at the router's truncation) against sentence-transformers on
PyTorch with the model's own settings (256 tokens), measured in the same process, one after the
other. A fine-tuned router ships its encoder as ONNX only; its reference is the base model it was
fine-tuned from (the same network and cost), whose embeddings the head was not trained on, so
the reference's accuracy is not reported then.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from coe.router.base import Embedder
from coe.router.data import LabelledPrompt
from coe.router.embed import EmbedderSettings, load_embedder
from coe.router.router import TwoStageRouter

SHORT_PROMPT = "Sort a list of tuples by their second item in Python, please."
LONG_PROMPT = (
    "I run a small bakery and keep my orders in a spreadsheet. Every morning I export it as CSV "
    "with the columns date, customer, item, quantity, unit price and paid (yes/no). Lately the "
    "file has grown to a few thousand rows and I spend half an hour totalling what each "
    "customer still owes, grouping the unpaid orders by week and checking which items sell "
    "best on Saturdays. I would like a small script I can run from the command line that reads "
    "the CSV, prints the amount every customer owes sorted from largest to smallest, shows the "
    "unpaid total per ISO week, and lists the five best-selling items on Saturdays by quantity. "
    "Dates look like 2024-03-09, prices use a dot for decimals, and some rows have an empty "
    "quantity that should count as zero. Please keep it to the standard library if you can, "
    "explain how to run it, and add a short test with a made-up CSV so I can check it works "
    "before I trust it with the real books at the end of the month. If a row is malformed, the "
    "script should say which line and carry on instead of stopping halfway. Thank you!"
)


@dataclass
class PathFigures:
    label: str
    backend: str
    max_seq_length: int
    short_p50_ms: float
    short_p99_ms: float
    long_p50_ms: float
    long_p99_ms: float
    batched_prompts_per_s: float
    batched_accuracy: float | None = None


@dataclass
class RouterBench:
    prompts: int
    repeats: int
    batch_size: int
    long_prompt_chars: int
    short_prompt_chars: int
    router: PathFigures
    reference: PathFigures
    speedup: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _latency_ms(router: TwoStageRouter, text: str, repeats: int) -> tuple[float, float]:
    router.classify([text])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        router.classify([text])
        times.append(time.perf_counter() - t0)
    return (
        round(float(np.percentile(times, 50)) * 1e3, 2),
        round(float(np.percentile(times, 99)) * 1e3, 2),
    )


def _measure(
    label: str, router: TwoStageRouter, rows: list[LabelledPrompt], repeats: int
) -> PathFigures:
    short = _latency_ms(router, SHORT_PROMPT, repeats)
    long = _latency_ms(router, LONG_PROMPT, repeats)
    texts = [r.prompt for r in rows]
    t0 = time.perf_counter()
    proba = router.classify(texts)
    elapsed = time.perf_counter() - t0
    known = [i for i, r in enumerate(rows) if r.category in router.categories]
    accuracy = None
    if known:
        predicted = proba.argmax(1)
        hits = [router.categories[predicted[i]] == rows[i].category for i in known]
        accuracy = round(float(np.mean(hits)), 4)
    embedder: Embedder = router.embedder
    return PathFigures(
        label=label,
        backend=embedder.backend,
        max_seq_length=embedder.max_seq_length,
        short_p50_ms=short[0],
        short_p99_ms=short[1],
        long_p50_ms=long[0],
        long_p99_ms=long[1],
        batched_prompts_per_s=round(len(texts) / elapsed, 1),
        batched_accuracy=accuracy,
    )


def run_router_bench(
    router: TwoStageRouter, rows: list[LabelledPrompt], repeats: int = 100
) -> RouterBench:
    fast = _measure("router", router, rows, repeats)
    base_model = router.artifact.embedder.get("base_model")
    reference_embedder = load_embedder(
        EmbedderSettings(
            model=base_model or router.embedder.model_id,
            backend="torch",
            max_seq_length=256,
            tail_tokens=0,
        )
    )
    reference_router = copy.copy(router)  # the same classifier and threshold, another embedder
    reference_router.embedder = reference_embedder
    reference = _measure("plain sentence-transformers (PyTorch)", reference_router, rows, repeats)
    if base_model:
        reference.batched_accuracy = None  # the head was trained on the fine-tuned embeddings
    return RouterBench(
        prompts=len(rows),
        repeats=repeats,
        batch_size=router.embedder.settings.batch_size,  # type: ignore[attr-defined]
        long_prompt_chars=len(LONG_PROMPT),
        short_prompt_chars=len(SHORT_PROMPT),
        router=fast,
        reference=reference,
        speedup={
            "short_p50": round(reference.short_p50_ms / fast.short_p50_ms, 2),
            "long_p50": round(reference.long_p50_ms / fast.long_p50_ms, 2),
            "batched": round(fast.batched_prompts_per_s / reference.batched_prompts_per_s, 2),
        },
    )
