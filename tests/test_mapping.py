"""The budgeted category -> expert map search on a small hand-made score table."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest

from coe.router.mapping import (
    MappingError,
    ScoreTable,
    best_within,
    load_scores,
    pareto_frontier,
    write_map,
)

from .conftest import COE, cli_env

# A big generalist, a small coder, a mid-size math model.
SCORES = {
    "big": {"coding": 7.0, "math": 7.0, "writing": 8.0},
    "coder": {"coding": 8.0, "math": 4.0, "writing": 3.0},
    "mathy": {"coding": 5.0, "math": 9.0, "writing": 4.0},
}
PARAMS = {"big": 70_000_000_000, "coder": 7_000_000_000, "mathy": 13_000_000_000}
FREQ = {"coding": 0.5, "math": 0.25, "writing": 0.25}


def brute_force(table: ScoreTable, budget: float) -> float:
    best = -1.0
    cats = table.categories
    for combo in itertools.product(list(table.scores), repeat=len(cats)):
        cost = sum(table.frequencies[c] * PARAMS[e] for c, e in zip(cats, combo, strict=True))
        score = sum(
            table.frequencies[c] * table.scores[e][c] for c, e in zip(cats, combo, strict=True)
        )
        if cost <= budget + 1e-6:
            best = max(best, score)
    return best


def test_frontier_is_exact_and_monotone() -> None:
    table = ScoreTable(scores=SCORES, frequencies=FREQ)
    frontier = pareto_frontier(table, PARAMS)
    costs = [m.avg_active_params for m in frontier]
    scores = [m.expected_score for m in frontier]
    assert costs == sorted(costs) and scores == sorted(scores)
    assert len(set(scores)) == len(scores)  # dominated maps were pruned
    # Unlimited budget: the best expert per category.
    top = best_within(frontier, None)
    assert top.assignment == {"coding": "coder", "math": "mathy", "writing": "big"}
    assert top.expected_score == pytest.approx(0.5 * 8 + 0.25 * 9 + 0.25 * 8)
    for budget in (7e9, 9e9, 12e9, 20e9, 30e9):
        assert best_within(frontier, budget).expected_score == pytest.approx(
            brute_force(table, budget)
        )


def test_budget_below_the_cheapest_map_is_an_error() -> None:
    frontier = pareto_frontier(ScoreTable(scores=SCORES, frequencies=FREQ), PARAMS)
    with pytest.raises(MappingError, match="cheapest needs"):
        best_within(frontier, 1e9)


def test_missing_parameter_count_is_an_error() -> None:
    with pytest.raises(MappingError, match="params"):
        pareto_frontier(ScoreTable(scores=SCORES, frequencies=FREQ), {"big": 1})


def test_write_map_keeps_comments_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "experts.yaml"
    path.write_text(
        "# my pool\nexperts: []\ncategories:\n"
        "  - {name: coding, expert: big}  # code\n"
        "  - name: math\n    expert: big\n"
        "  - {name: general, expert: big}\n"
    )
    changes = write_map(path, {"coding": "coder", "math": "mathy"})
    assert changes == ["coding: big -> coder", "math: big -> mathy"]
    assert path.read_text() == (
        "# my pool\nexperts: []\ncategories:\n"
        "  - {name: coding, expert: coder}  # code\n"
        "  - name: math\n    expert: mathy\n"
        "  - {name: general, expert: big}\n"
    )


def test_router_map_cli_writes_the_chosen_map(tmp_path: Path) -> None:
    expert = {"model": "coe:gemma-3-270m"}
    pool = tmp_path / "experts.yaml"
    pool.write_text(
        "experts:\n"
        + "".join(
            f"  - {{name: {n}, model: '{expert['model']}', params: {p}}}\n"
            for n, p in PARAMS.items()
        )
        + "categories:\n"
        + "".join(f"  - {{name: {c}, expert: big}}\n" for c in [*FREQ, "general"])
    )
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"scores": SCORES, "frequencies": FREQ}))
    assert load_scores(scores).frequencies == FREQ
    run = subprocess.run(
        [COE, "--config", str(pool), "router", "map", "--scores", str(scores),
         "--budget-params", "12e9", "--write", "--json"],
        capture_output=True, text=True, timeout=120, env=cli_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["chosen"]["avg_active_params"] <= 12e9
    assert len(out["frontier"]) >= 3
    written = pool.read_text()
    for category, chosen in out["chosen"]["assignment"].items():
        assert f"{{name: {category}, expert: {chosen}}}" in written
