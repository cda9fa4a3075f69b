"""Prompt strategies: mixture-of-prompts regions (planted clusters, the real embedder), expert
identities (static, generated, cached, over budget), prompt assembly and template rendering."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from coe.config import Category, ExpertPromptingSettings, parse_config
from coe.engines.render import fold_system, render_text
from coe.orchestrator import Orchestrator
from coe.prompts.identity import IdentityWriter, clean_identity, writer_prompt
from coe.prompts.mixture import (
    Demo,
    MixtureError,
    approx_tokens,
    choose_regions,
    fit_mixture,
    load_mixture,
)
from coe.prompts.strategies import Shaping
from coe.store import MemoryStore
from coe.types import Message, Prompt

from .conftest import coe

DIM = 16


def blobs(centres: int, per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated unit-norm clusters: centre i is the i-th axis, plus a little noise."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for c in range(centres):
        centre = np.eye(DIM)[c]
        for _ in range(per):
            v = centre + 0.05 * rng.standard_normal(DIM)
            points.append(v / np.linalg.norm(v))
            labels.append(c)
    return np.array(points, dtype=np.float32), np.array(labels)


class PlantedEmbedder:
    """Texts named "topic-<i> ..." embed near axis i (deterministically, by a hash of the text)."""

    model_id = "planted"
    fingerprint = "planted-1"
    dim = DIM
    backend = "test"
    max_seq_length = 64

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            topic = int(text.split()[0].split("-")[1])
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            v = np.eye(DIM)[topic] + 0.05 * np.random.default_rng(seed).standard_normal(DIM)
            rows.append(v / np.linalg.norm(v))
        return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("planted", [2, 3, 5])
def test_automatic_k_finds_the_planted_clusters(planted: int) -> None:
    x, truth = blobs(planted, per=12)
    k, _, labels, scores = choose_regions(x, seed=0)
    assert k == planted
    assert len(scores) == 8
    # Same partition as the truth, up to the names of the clusters.
    assert len({(int(a), int(b)) for a, b in zip(truth, labels, strict=True)}) == planted


def test_clustering_is_deterministic_for_a_seed() -> None:
    x, _ = blobs(3, per=10, seed=4)
    first = choose_regions(x, seed=7)
    second = choose_regions(x, seed=7)
    assert first[0] == second[0]
    assert np.array_equal(first[1], second[1]) and np.array_equal(first[2], second[2])


def planted_mixture() -> tuple[object, PlantedEmbedder]:
    embedder = PlantedEmbedder()
    demos = [Demo(f"topic-{t} question {i}", f"answer {i}" * (1 + i)) for t in range(3)
             for i in range(6)]  # fmt: skip
    candidates = ["topic-0 instruction", "topic-1 instruction", "topic-2 instruction"]
    return fit_mixture("math", demos, candidates, embedder, seed=0), embedder


def test_each_region_gets_its_own_instruction_and_a_prompt_its_nearest_region() -> None:
    mixture, embedder = planted_mixture()
    assert mixture.regions == 3
    for topic in range(3):
        e = embedder.encode([f"topic-{topic} a new prompt"])[0]
        region = mixture.region_of(e)
        assert mixture.instructions[region] == f"topic-{topic} instruction"
        demos = mixture.demos_for(region, e, token_budget=10_000, max_demos=3)
        assert len(demos) == 3 and all(d.input.startswith(f"topic-{topic} ") for d in demos)


def test_demos_stay_within_the_token_budget_nearest_first() -> None:
    mixture, embedder = planted_mixture()
    e = embedder.encode(["topic-1 a new prompt"])[0]
    region = mixture.region_of(e)
    everything = mixture.demos_for(region, e, token_budget=10_000, max_demos=6)
    assert len(everything) == 6
    cost = [approx_tokens(d.input) + approx_tokens(d.output) for d in everything]
    budget = cost[0] + cost[1]
    capped = mixture.demos_for(region, e, token_budget=budget, max_demos=6)
    assert sum(approx_tokens(d.input) + approx_tokens(d.output) for d in capped) <= budget
    assert capped[:2] == everything[:2]
    assert mixture.demos_for(region, e, token_budget=0, max_demos=6) == []


def test_artifacts_round_trip_without_pickle(tmp_path: Path) -> None:
    mixture, _ = planted_mixture()
    folder = mixture.save(tmp_path / "math")
    loaded = load_mixture(folder)
    assert loaded.instructions == mixture.instructions and loaded.demos == mixture.demos
    assert np.array_equal(loaded.centroids, mixture.centroids)
    # A description that is not one is named, not a traceback.
    meta = json.loads((folder / "mixture.json").read_text())
    (folder / "mixture.json").write_text(json.dumps({**meta, "demos": [{"in": "x"}]}))
    with pytest.raises(MixtureError, match="incomplete"):
        load_mixture(folder)
    (folder / "mixture.json").write_text(json.dumps(meta))
    # An array file that needs pickle (object arrays) is refused, not executed.
    np.savez(folder / "arrays.npz", centroids=np.array([{"x": 1}], dtype=object))
    with pytest.raises(MixtureError, match="coe prompts fit"):
        load_mixture(folder)


def test_mixture_with_the_real_embedder(tmp_path: Path) -> None:
    from coe.router.embed import load_embedder

    groups = {
        "sql": ["Write a SQL query that counts orders per customer.",
                "Select the ten newest rows from the events table in SQL.",
                "Join users and payments in SQL and sum the amounts.",
                "Write an SQL statement deleting duplicate emails.",
                "Group sales by month with a SQL query."],
        "poem": ["Write a haiku about autumn leaves.",
                 "Compose a short poem about the sea at night.",
                 "Write a sonnet about a lost letter.",
                 "A four-line rhyme about a sleepy cat, please.",
                 "Write a poem about snow on the mountains."],
        "arithmetic": ["What is 17 times 23?", "Compute 144 divided by 12.",
                       "Add 389 and 1245.", "What is 15 percent of 80?",
                       "Subtract 57 from 203."],
    }  # fmt: skip
    demos = [Demo(text, "...") for texts in groups.values() for text in texts]
    candidates = ["Write correct SQL.", "Write a vivid poem.", "Do the arithmetic exactly."]
    embedder = load_embedder()
    mixture = fit_mixture("mixed", demos, candidates, embedder, seed=0)
    assert mixture.regions == 3
    for prompt, instruction in (
        ("Write a SQL query listing products without stock.", "Write correct SQL."),
        ("Write a poem about a red balloon.", "Write a vivid poem."),
        ("What is 31 times 7?", "Do the arithmetic exactly."),
    ):
        region = mixture.region_of(embedder.encode([prompt])[0])
        assert mixture.instructions[region] == instruction, prompt


# -- expert identities ----------------------------------------------------------------------

CATEGORY = Category(name="stem", expert="x", identity="You are a careful scientist.")


def writer_settings(**kw: object) -> ExpertPromptingSettings:
    return ExpertPromptingSettings(mode="generated", **kw)  # type: ignore[arg-type]


async def test_static_identity_needs_no_call() -> None:
    async def never(messages: list[Message]) -> str:
        raise AssertionError("static mode must not call the writer")

    writer = IdentityWriter(ExpertPromptingSettings(), MemoryStore(), never)
    found = await writer.identity(CATEGORY, "Why is ice slippery?")
    assert (found.text, found.source) == ("You are a careful scientist.", "static")


async def test_generated_identity_is_cached_by_instruction() -> None:
    calls: list[list[Message]] = []

    async def write(messages: list[Message]) -> str:
        calls.append(messages)
        return "You are a glaciologist who studies ice surfaces.\n\nMore text."

    writer = IdentityWriter(writer_settings(), MemoryStore(), write)
    first = await writer.identity(CATEGORY, "Why is ice slippery?")
    second = await writer.identity(CATEGORY, "Why is ice slippery?")
    assert first.source == "generated" and second.source == "cached"
    assert first.text == second.text == "You are a glaciologist who studies ice surfaces."
    assert len(calls) == 1 and calls[0][-1] == Message("user", "Why is ice slippery?")


async def test_slow_or_failed_writing_falls_back_to_the_static_identity() -> None:
    async def slow(messages: list[Message]) -> str:
        await asyncio.sleep(0.3)
        return "You are a volcanologist."

    writer = IdentityWriter(writer_settings(budget_s=0.05), MemoryStore(), slow)
    late = await writer.identity(CATEGORY, "How do volcanoes form?")
    assert (late.text, late.source) == ("You are a careful scientist.", "fallback")
    await asyncio.sleep(0.4)  # the writing went on and filled the cache
    assert (await writer.identity(CATEGORY, "How do volcanoes form?")).source == "cached"

    async def broken(messages: list[Message]) -> str:
        raise RuntimeError("engine down")

    failed = IdentityWriter(writer_settings(), MemoryStore(), broken)
    assert (await failed.identity(CATEGORY, "x")).source == "fallback"


def test_writer_prompt_and_cleaning() -> None:
    messages = writer_prompt("  Fix my bike chain.  ")
    assert messages[0].role == "system" and messages[-1] == Message("user", "Fix my bike chain.")
    assert sum(m.role == "assistant" for m in messages) >= 3
    assert clean_identity("You are a bicycle mechanic of twenty years.\n\nQuestion: x")
    assert clean_identity("Question: what?") is None


# -- assembly and rendering -------------------------------------------------------------------


def strategy_pool() -> Orchestrator:
    config = parse_config(
        {
            "experts": [{"name": "e", "model": "/x", "system_prompt": "Be brief."}],
            "categories": [{"name": "general", "expert": "e"}],
        },
        "experts.yaml",
    )
    return Orchestrator(config, engines=object())  # type: ignore[arg-type]


def test_identity_and_demos_come_before_the_conversation() -> None:
    orch = strategy_pool()
    expert = orch.config.expert("e")
    shaping = Shaping(
        strategy="mixture_of_prompts",
        system="Solve it step by step.",
        demos=(Demo("2+2?", "4"),),
        region=1,
    )
    prompt = orch.build_prompt(expert, [Message("user", "3+3?")], shaping=shaping)
    assert prompt.messages == (
        Message("system", "Solve it step by step.\n\nBe brief."),
        Message("user", "2+2?"),
        Message("assistant", "4"),
        Message("user", "3+3?"),
    )
    # The caller's own system prompt replaces the shaped one.
    own = orch.build_prompt(expert, [Message("user", "3+3?")], "Just the number.", shaping)
    assert own.messages[0] == Message("system", "Just the number.")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def render_with(tokenizer, template: str) -> str:  # type: ignore[no-untyped-def]
    """A system + user prompt rendered with ``template`` in place of the model's own."""
    tokenizer.chat_template = template
    try:
        return render_text(
            tokenizer, Prompt((Message("system", "You are terse."), Message("user", "Hi")))
        )
    finally:
        tokenizer.chat_template = None


def test_template_with_a_system_role_keeps_it(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = render_with(tokenizer, CHATML)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_without_a_system_role_gets_it_folded(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = render_with(tokenizer, NO_SYSTEM)
    assert text == "[user] You are terse.\n\nHi\n"
    assert fold_system([Message("system", "S"), Message("user", "U")]) == [
        Message("user", "S\n\nU")
    ]


def test_route_json_names_the_strategy(tmp_path: Path) -> None:
    run = coe("route", "--json", "Write a limerick about a cat")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["category"] == "writing" and out["strategy"] == "expert_prompting"
    assert out["identity"].startswith("You are") and out["identity_source"] == "static"


async def test_missing_region_folder_fails_at_start_naming_the_fix(tmp_path: Path) -> None:
    config = parse_config(
        {
            "experts": [{"name": "e", "model": "/x"}],
            "categories": [
                {"name": "general", "expert": "e", "strategy": "mixture_of_prompts",
                 "prompts": "regions/general"},
            ],
        },
        tmp_path / "experts.yaml",
    )  # fmt: skip
    orch = Orchestrator(config, engines=object())  # type: ignore[arg-type]
    with pytest.raises(MixtureError, match=r"regions/general.*coe prompts fit"):
        await orch.start()
