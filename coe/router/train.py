"""Fit a router: pick hyper-parameters, calibrate and choose the fallback threshold, all by
cross-validation on the training data alone (never on an evaluation set)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

from coe.router.artifact import RouterArtifact
from coe.router.base import Embedder
from coe.router.classifier import CategoryClassifier, Kind, fit_temperature, softmax
from coe.router.data import LabelledPrompt, category_counts, data_hash
from coe.router.embed import describe

GRID: dict[str, list[dict[str, Any]]] = {
    "logreg": [{"C": c} for c in (1.0, 3.0, 10.0, 30.0, 100.0)],
    "knn": [{"k": k} for k in (5, 10, 20, 40)],
}


@dataclass
class CrossValidation:
    params: dict[str, Any]
    proba: np.ndarray  # out-of-fold probabilities (calibrated for logreg)
    temperature: float
    accuracy: float
    macro_f1: float


def _out_of_fold(
    x: np.ndarray, y: np.ndarray, categories: list[str], kind: Kind, params: dict, folds: int
) -> np.ndarray:
    """Out-of-fold logits (logreg) or probabilities (knn), one row per training prompt."""
    out = np.zeros((len(y), len(categories)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    labels = [categories[i] for i in y]
    for train_idx, test_idx in splitter.split(x, y):
        clf = CategoryClassifier.fit(x[train_idx], [labels[i] for i in train_idx], kind, **params)
        cols = [categories.index(c) for c in clf.categories]
        part = clf.logits(x[test_idx]) if kind == "logreg" else clf.predict_proba(x[test_idx])
        if kind == "logreg":
            out[test_idx] = -1e9  # a class absent from a fold can never be predicted there
        out[np.ix_(test_idx, cols)] = part
    return out


def cross_validate(
    x: np.ndarray, labels: list[str], kind: Kind = "logreg", folds: int = 5
) -> CrossValidation:
    categories = sorted(set(labels))
    y = np.array([categories.index(c) for c in labels])
    best: CrossValidation | None = None
    for params in GRID[kind]:
        raw = _out_of_fold(x, y, categories, kind, params, folds)
        temperature = fit_temperature(raw, y) if kind == "logreg" else 1.0
        proba = softmax(raw / temperature) if kind == "logreg" else raw
        pred = proba.argmax(1)
        cv = CrossValidation(
            params=params,
            proba=proba,
            temperature=temperature,
            accuracy=float(accuracy_score(y, pred)),
            macro_f1=float(f1_score(y, pred, average="macro")),
        )
        if best is None or cv.macro_f1 > best.macro_f1:
            best = cv
    assert best is not None
    return best


def choose_threshold(proba: np.ndarray, y: np.ndarray, fallback_value: float) -> float:
    """The confidence below which a request goes to the fallback category.

    Counts a right specialist as 1, a wrong one as 0 and a fallback answer as ``fallback_value``
    (a generalist answers anything, but less well), and picks the threshold that scores best on
    out-of-fold predictions. Ties go to the lower threshold (fewer fallbacks).
    """
    conf = proba.max(1)
    correct = proba.argmax(1) == y
    best_t, best_u = 0.0, -1.0
    for t in np.unique(np.concatenate([[0.0], conf])):
        accepted = conf >= t
        utility = float(correct[accepted].sum() + fallback_value * (~accepted).sum())
        if utility > best_u + 1e-9:
            best_t, best_u = float(t), utility
    return round(best_t, 4)


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf, correct = proba.max(1), proba.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def fit_router(
    rows: list[LabelledPrompt],
    embedder: Embedder,
    *,
    kind: Kind = "logreg",
    folds: int = 5,
    fallback_value: float = 0.5,
    source: str = "",
    report: Callable[[str], None] = lambda _m: None,
) -> RouterArtifact:
    counts = category_counts(rows)
    if len(counts) < 2:
        raise ValueError("training data needs at least two categories")
    too_few = {c: n for c, n in counts.items() if n < folds}
    if too_few:
        raise ValueError(
            f"every category needs at least {folds} examples for {folds}-fold cross-validation; "
            f"too few: {too_few}"
        )
    report(f"embedding {len(rows)} prompts with {embedder.model_id} ({embedder.backend})")
    x = embedder.encode([r.prompt for r in rows])
    labels = [r.category for r in rows]
    report(f"cross-validating {kind} ({folds} folds)")
    cv = cross_validate(x, labels, kind, folds)
    categories = sorted(counts)
    y = np.array([categories.index(c) for c in labels])
    threshold = choose_threshold(cv.proba, y, fallback_value)
    confident = cv.proba.max(1) >= threshold
    classifier = CategoryClassifier.fit(x, labels, kind, **cv.params)
    classifier.temperature = cv.temperature
    metrics = {
        "cv_folds": folds,
        "cv_accuracy": round(cv.accuracy, 4),
        "cv_macro_f1": round(cv.macro_f1, 4),
        "cv_expected_calibration_error": round(expected_calibration_error(cv.proba, y), 4),
        "cv_fallback_rate": round(float((~confident).mean()), 4),
        "cv_accuracy_when_confident": round(
            float((cv.proba.argmax(1) == y)[confident].mean()) if confident.any() else 0.0, 4
        ),
        "fallback_value": fallback_value,
    }
    return RouterArtifact(
        path=None,
        embedder=describe(embedder),  # type: ignore[arg-type]
        classifier=classifier,
        threshold=threshold,
        training={"file": source, "n": len(rows), "sha256": data_hash(rows), "counts": counts},
        metrics=metrics,
    )
