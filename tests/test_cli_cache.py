"""The weight cache's commands: `coe bench swap`, `coe bench pool` and `coe experts` tiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from coe.models.variants import prepared_variant

from .conftest import TEST_EXPERT_DEFAULTS, coe


@pytest.mark.engine
def test_bench_swap_json_reports_every_tier_beside_cold_start_and_the_floor() -> None:
    result = coe("bench", "swap", "--json", "--repeats", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    for key in (
        "engine_cold_start_s",
        "disk_to_host_s",
        "host_to_hbm_checkpoint_layout_s",
        "host_to_hbm_s",
        "disk_to_hbm_s",
        "floor_checkpoint_bytes_s",
        "effective_gb_s",
    ):
        assert figures[key] > 0, key
    assert figures["checkpoint_bytes"] > 500_000_000
    # The swapped-in expert answered as a fresh engine started from its own checkpoint, and the
    # base model answers otherwise (so the comparison can tell the weights apart).
    assert "fresh engine started from" in figures["answers_compared"]
    assert figures["reference_answer"].strip() and figures["base_answer_differs"] is True
    first, last = figures["swapped_answers"]
    assert first == last == figures["reference_answer"]
    assert figures["answers_match"] is True
    assert figures["page_cache"]
    assert len(figures["host_to_hbm_samples_s"]) == 2
    # A swap from the host tier is far cheaper than starting an engine for the expert.
    assert figures["cold_start_vs_swap"] > 10


@pytest.mark.engine
def test_bench_pool_json_compares_the_scheduler_with_both_references() -> None:
    result = coe(
        "bench",
        "pool",
        "--json",
        "--experts",
        "2",
        "--requests",
        "8",
        "--tokens",
        "8",
        "--rate",
        "20",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert set(figures["modes"]) == {"scheduler", "naive", "resident"}
    for mode in figures["modes"].values():
        assert mode["requests"] == 8 and mode["tokens"] == 64
        assert mode["tokens_per_s"] > 0 and mode["p95_latency_s"] >= mode["p50_latency_s"] > 0
    assert figures["modes"]["resident"]["switches"] == 0
    assert figures["scheduler_vs_naive"] > 0 and figures["scheduler_vs_resident"] > 0


def test_experts_shows_planned_tiers_for_a_pool_with_fewer_slots_than_checkpoints(
    model_dir: Path, tmp_path: Path
) -> None:
    variant = prepared_variant(1)
    experts = [
        {**TEST_EXPERT_DEFAULTS, "name": "base", "model": str(model_dir)},
        {**TEST_EXPERT_DEFAULTS, "name": "also-base", "model": str(model_dir)},
        {**TEST_EXPERT_DEFAULTS, "name": "variant", "model": str(variant)},
    ]
    config = {
        "experts": experts,
        "categories": [{"name": "general", "expert": "base"}],
        "cache": {"hbm_bytes": 2 * 1024**3},
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(config))
    result = coe("--config", str(path), "experts", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["experts"]}
    assert rows["base"]["tier"] == "hbm" and rows["also-base"]["tier"] == "hbm"
    assert rows["variant"]["tier"] == "disk"
    assert rows["variant"]["bytes"] > 500_000_000
    assert rows["base"]["slot_group"] == rows["variant"]["slot_group"]


def test_bench_pool_needs_at_least_two_experts() -> None:
    result = coe("bench", "pool", "--experts", "1", timeout=60)
    assert result.returncode == 2
    assert "at least 2 experts share the slot" in result.stderr
