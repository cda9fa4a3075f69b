"""The category -> expert map, chosen from measurements (the Composition-of-Experts step).

Given each expert's score per category (from ``coe eval``), each expert's parameter count and how
often each category occurs, every map has an expected score (frequency-weighted) and an average
number of active parameters (what a request costs on average). Both sums separate by category,
so the exact Pareto frontier is built one category at a time, keeping only maps that no other
map beats on both cost and score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coe.errors import BadRequestError


class MappingError(BadRequestError):
    pass


@dataclass(frozen=True)
class ExpertMap:
    assignment: dict[str, str]  # category -> expert
    expected_score: float
    avg_active_params: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "assignment": self.assignment,
            "expected_score": round(self.expected_score, 4),
            "avg_active_params": round(self.avg_active_params),
        }


@dataclass
class ScoreTable:
    scores: dict[str, dict[str, float]]  # expert -> category -> score
    frequencies: dict[str, float]  # category -> weight, sums to 1

    @property
    def categories(self) -> list[str]:
        return list(self.frequencies)


def load_scores(path: Path | str) -> ScoreTable:
    """``{"scores": {expert: {category: score}}, "frequencies": {category: weight}}``.

    ``frequencies`` is optional (uniform over the scored categories when missing).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MappingError(f"{path}: cannot read scores ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("scores"), dict):
        raise MappingError(f'{path}: expected {{"scores": {{expert: {{category: score}}}}}}')
    scores = {
        e: {c: float(s) for c, s in per.items() if s is not None}
        for e, per in raw["scores"].items()
    }
    categories = sorted({c for per in scores.values() for c in per})
    freq = raw.get("frequencies") or dict.fromkeys(categories, 1.0)
    unknown = [c for c in freq if c not in categories]
    if unknown:
        raise MappingError(
            f"{path}: frequencies name categories no expert has a score for: {unknown}"
        )
    total = sum(freq.values())
    if total <= 0:
        raise MappingError(f"{path}: frequencies must add up to more than 0")
    return ScoreTable(scores=scores, frequencies={c: w / total for c, w in freq.items()})


def pareto_frontier(table: ScoreTable, params: dict[str, int]) -> list[ExpertMap]:
    """All maps not dominated in (average active parameters, expected score), cheapest first."""
    missing = [e for e in table.scores if e not in params]
    if missing:
        raise MappingError(
            f"no parameter count for expert(s) {', '.join(missing)}: set `params:` for them in "
            "experts.yaml"
        )
    # Each point: (cost, score, assignment).
    frontier: list[tuple[float, float, dict[str, str]]] = [(0.0, 0.0, {})]
    for category, weight in table.frequencies.items():
        options = [(e, per[category]) for e, per in table.scores.items() if category in per]
        grown = [
            (cost + weight * params[e], score + weight * s, assignment | {category: e})
            for cost, score, assignment in frontier
            for e, s in options
        ]
        frontier = _prune(grown)
    return [ExpertMap(a, s, c) for c, s, a in frontier]


def _prune(points: list[tuple[float, float, dict[str, str]]]) -> list:
    points.sort(key=lambda p: (p[0], -p[1]))
    kept: list[tuple[float, float, dict[str, str]]] = []
    for p in points:
        if not kept or p[1] > kept[-1][1] + 1e-12:
            kept.append(p)
    return kept


def best_within(frontier: list[ExpertMap], budget: float | None) -> ExpertMap:
    """The highest-scoring map whose average active parameters fit the budget."""
    affordable = [m for m in frontier if budget is None or m.avg_active_params <= budget + 1e-6]
    if not affordable:
        cheapest = frontier[0].avg_active_params
        raise MappingError(
            f"no map fits a budget of {budget:,.0f} parameters; the cheapest needs {cheapest:,.0f}"
        )
    return max(affordable, key=lambda m: m.expected_score)


def write_map(config_path: Path | str, assignment: dict[str, str]) -> list[str]:
    """Set ``categories[].expert`` in experts.yaml in place, keeping comments and layout.

    Returns the lines changed as ``category: old -> new``.
    """
    config_path = Path(config_path)
    text = config_path.read_text()
    root = yaml.compose(text)
    categories = _mapping_value(root, "categories") if root is not None else None
    if not isinstance(categories, yaml.SequenceNode):
        raise MappingError(f"{config_path}: no `categories:` list to write the map into")
    edits: list[tuple[int, int, str]] = []
    changes = []
    for item in categories.value:
        name_node = _mapping_value(item, "name")
        expert_node = _mapping_value(item, "expert")
        if name_node is None or expert_node is None:
            continue
        new = assignment.get(name_node.value)
        if new is not None and new != expert_node.value:
            edits.append((expert_node.start_mark.index, expert_node.end_mark.index, new))
            changes.append(f"{name_node.value}: {expert_node.value} -> {new}")
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    if edits:
        config_path.write_text(text)
    return changes


def _mapping_value(node: yaml.Node, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v
    return None
