"""`coe router eval`'s figures on a router whose probabilities are fixed: strict, coarse and
right-expert accuracy, calibration error, accuracy against coverage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from coe.router.data import LabelledPrompt
from coe.router.evaluate import COARSE, evaluate
from coe.router.train import cross_fitted_ece, expected_calibration_error


class FixedRouter:
    """Probabilities looked up by prompt text."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.categories = ["coding", "extraction", "math", "writing"]
        self.fallback = "general"
        self.threshold = 0.5
        self.expert_of = {
            "coding": "coder",
            "extraction": "generalist",
            "math": "mathematician",
            "writing": "writer",
            "general": "generalist",
        }

    def classify(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.table[t] for t in texts])


def test_strict_coarse_and_expert_accuracy() -> None:
    router = FixedRouter(
        {
            "a": [0.9, 0.1, 0.0, 0.0],  # coding, right
            "b": [0.6, 0.4, 0.0, 0.0],  # extraction taken for coding: coarse right, expert wrong
            "c": [0.0, 0.0, 0.3, 0.7],  # math taken for writing: all wrong
            "d": [0.0, 0.55, 0.45, 0.0],  # math taken for extraction at 0.55
            "e": [0.4, 0.0, 0.35, 0.25],  # coding at 0.4: below the threshold, so the fallback
        }
    )
    rows = [
        LabelledPrompt("a", "coding"),
        LabelledPrompt("b", "extraction"),
        LabelledPrompt("c", "math"),
        LabelledPrompt("d", "math"),
        LabelledPrompt("e", "extraction"),
    ]
    report = evaluate(router, rows)  # type: ignore[arg-type]
    assert report.accuracy == pytest.approx(1 / 5)
    # a, b and e are in the coding group; d's extraction is not math's group.
    assert report.coarse_accuracy == pytest.approx(3 / 5)
    # Reached: coder, coder (wrong: extraction's expert is the generalist), writer, generalist
    # (wrong), and e's fallback: the generalist, which is extraction's expert (right).
    assert report.expert_accuracy == pytest.approx(2 / 5)
    assert report.fallback_rate == pytest.approx(1 / 5)
    own = next(p for p in report.coverage if p["threshold"] == 0.5)
    assert own["coverage"] == pytest.approx(4 / 5) and own["accuracy"] == pytest.approx(1 / 4)
    assert report.coverage[-1]["coverage"] == 0.0 and report.coverage[-1]["accuracy"] is None


def test_arena_hard_labels_count_by_their_group() -> None:
    router = FixedRouter({"p": [0.0, 0.9, 0.1, 0.0], "q": [0.0, 0.0, 0.2, 0.8]})
    report = evaluate(router, [LabelledPrompt("p", "coding"), LabelledPrompt("q", "writing")])  # type: ignore[arg-type]
    assert report.accuracy == pytest.approx(0.5) and report.coarse_accuracy == 1.0
    assert set(COARSE.values()) == {"coding", "math", "writing"}


def test_calibration_error_is_zero_when_confidence_matches_accuracy() -> None:
    proba = np.array([[0.8, 0.2]] * 10)
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(proba, y) == pytest.approx(0.0)
    overconfident = np.array([[0.99, 0.01]] * 10)
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.19)


def test_cross_fitted_ece_finds_a_temperature_that_calibrates() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3))
    logits[np.arange(2000), y] += 1.5
    sharp = logits * 8  # far too confident as it is
    assert expected_calibration_error(np.exp(sharp) / np.exp(sharp).sum(1, keepdims=True), y) > 0.15
    assert cross_fitted_ece(sharp, y) < 0.05
