"""Fit a router: pick hyper-parameters, calibrate and choose the fallback threshold, all by
cross-validation on the training data alone (never on an evaluation set)."""

from __future__ import annotations

import itertools
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

from coe.router.artifact import RouterArtifact
from coe.router.base import Embedder
from coe.router.classifier import CategoryClassifier, fit_temperature, softmax
from coe.router.classifiers.registry import classifier_kind
from coe.router.data import LabelledPrompt, category_counts, data_hash, split_heldout
from coe.router.embed import EmbedderSettings, describe, load_embedder
from coe.router.finetune import FinetuneSettings, finetune_encoder
from coe.router.followup import FOLLOWUP, FollowupDetector, with_new_task_opener

# A fine-tuned router keeps its encoder in this folder, beside router.json.
ENCODER_DIR = "encoder"


@dataclass
class CrossValidation:
    params: dict[str, Any]
    proba: np.ndarray  # out-of-fold probabilities (calibrated when the kind gives logits)
    temperature: float
    accuracy: float
    macro_f1: float


def _out_of_fold(
    x: np.ndarray, y: np.ndarray, categories: list[str], kind: str, params: dict, folds: int
) -> np.ndarray:
    """Out-of-fold logits (or probabilities, for a kind without logits), one row per training
    prompt."""
    out = np.zeros((len(y), len(categories)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    labels = [categories[i] for i in y]
    for train_idx, test_idx in splitter.split(x, y):
        clf = CategoryClassifier.fit(x[train_idx], [labels[i] for i in train_idx], kind, **params)
        cols = [categories.index(c) for c in clf.categories]
        if clf.gives_logits:
            part = clf.logits(x[test_idx])
            out[test_idx] = -1e9  # a class absent from a fold can never be predicted there
        else:
            part = clf.predict_proba(x[test_idx])
        out[np.ix_(test_idx, cols)] = part
    return out


def cross_validate(
    x: np.ndarray, labels: list[str], kind: str = "logreg", folds: int = 5
) -> CrossValidation:
    categories = sorted(set(labels))
    y = np.array([categories.index(c) for c in labels])
    gives_logits = classifier_kind(kind).gives_logits
    best: CrossValidation | None = None
    for params in classifier_kind(kind).grid:
        raw = _out_of_fold(x, y, categories, kind, params, folds)
        temperature = fit_temperature(raw, y) if gives_logits else 1.0
        proba = softmax(raw / temperature) if gives_logits else raw
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
    kind: str = "logreg",
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


def cross_fitted_ece(logits: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """The calibration error of temperature scaling, measured honestly on one split: each half's
    probabilities come from the temperature fitted on the other half, then ECE over the whole."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    halves = order[: len(y) // 2], order[len(y) // 2 :]
    proba = np.zeros_like(logits, dtype=np.float64)
    for fit_on, measure_on in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_on], y[fit_on])
        proba[measure_on] = softmax(logits[measure_on] / t)
    return expected_calibration_error(proba, y)


def slice_accuracy(
    rows: list[LabelledPrompt], hits: np.ndarray
) -> dict[str, dict[str, float | int]]:
    """Accuracy on slices of labelled prompts: long, short, not English, and each tag."""
    slices: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        names = ["all"]
        names.append("long (300+ chars)" if len(r.prompt) >= 300 else "shorter")
        if r.lang != "en":
            names.append("not English")
        names += [f"tag {t}" for t in r.tags if t not in ("long",)]
        for name in names:
            slices.setdefault(name, []).append(i)
    return {
        name: {"n": len(idx), "accuracy": round(float(hits[idx].mean()), 4)}
        for name, idx in sorted(slices.items())
    }


def new_task_copies(
    rows: list[LabelledPrompt], seed: int, share: float = 0.12
) -> list[LabelledPrompt]:
    """Copies of some short and medium prompts opened as a new task mid-conversation
    ("ok, different question: ..."), with their category (see ``NEW_TASK_OPENERS``)."""
    rng = random.Random(seed)
    return [
        LabelledPrompt(
            with_new_task_opener(r.prompt, r.lang, rng), r.category, r.lang, (*r.tags, "opened")
        )
        for r in rows
        if len(r.prompt) < 600 and rng.random() < share
    ]


def fit_finetuned_router(
    rows: list[LabelledPrompt],
    out: Path,
    *,
    model: str,
    max_seq_length: int,
    tail_tokens: int,
    heldout_fraction: float,
    settings: FinetuneSettings,
    followups: list[LabelledPrompt] | None = None,
    fallback_value: float = 0.5,
    source: str = "",
    report: Callable[[str], None] = lambda _m: None,
) -> RouterArtifact:
    """Fine-tune the encoder on DATA's training split and build a router around it in OUT.

    The held-out split (a hash of each prompt decides its side) is never trained on: it measures
    the router, calibrates its confidence (a temperature) and sets its fallback threshold. The
    encoder is written to ``OUT/encoder`` only when everything else has succeeded.
    """
    counts = category_counts(rows)
    if len(counts) < 2:
        raise ValueError("training data needs at least two categories")
    train, held = split_heldout(rows, heldout_fraction)
    missing = sorted(set(counts) - {r.category for r in held})
    if missing:
        raise ValueError(
            f"the held-out split has no prompts of {', '.join(missing)}: add data or raise "
            "--heldout-fraction"
        )
    follow_train, follow_held = split_heldout(followups or [], heldout_fraction)
    switched_train = new_task_copies(train, settings.seed) if followups else []
    switched_held = new_task_copies(held, settings.seed) if followups else []
    train_tasks = train + switched_train
    texts = [r.prompt for r in train_tasks] + [r.prompt for r in follow_train]
    labels = [r.category for r in train_tasks] + [FOLLOWUP] * len(follow_train)
    report(
        f"fine-tuning {model} on {len(texts)} prompts ({len(follow_train)} follow-up turns, "
        f"{len(switched_train)} tasks opened mid-conversation); {len(held)} held out"
    )
    staging = out.parent / f".{out.name}.encoder-new"
    if staging.exists():
        shutil.rmtree(staging)
    tuned = finetune_encoder(
        texts,
        labels,
        model,
        staging,
        max_seq_length=max_seq_length,
        tail_tokens=tail_tokens,
        settings=settings,
        report=report,
    )
    embedder = load_embedder(
        EmbedderSettings(model=str(staging), max_seq_length=max_seq_length, tail_tokens=tail_tokens)
    )
    report("embedding the held-out split with the int8 encoder")
    x_held = embedder.encode([r.prompt for r in held])
    categories = sorted(counts)
    keep = [tuned.categories.index(c) for c in categories]
    # The fine-tuned linear head is a logistic regression's coef and intercept.
    classifier = CategoryClassifier.from_arrays(
        {"kind": "logreg", "categories": categories, "params": {"finetuned": True}},
        {"coef": tuned.coef[keep], "intercept": tuned.intercept[keep]},
    )
    y_held = np.array([categories.index(r.category) for r in held])
    logits = classifier.logits(x_held)
    classifier.temperature = fit_temperature(logits, y_held)
    proba = softmax(logits / classifier.temperature)
    pred = proba.argmax(1)
    threshold = choose_threshold(proba, y_held, fallback_value)
    confident = proba.max(1) >= threshold
    hits = pred == y_held
    metrics: dict[str, Any] = {
        "heldout_fraction": heldout_fraction,
        "heldout_n": len(held),
        "heldout_accuracy": round(float(hits.mean()), 4),
        "heldout_macro_f1": round(float(f1_score(y_held, pred, average="macro")), 4),
        "heldout_expected_calibration_error": round(cross_fitted_ece(logits, y_held), 4),
        "heldout_fallback_rate": round(float((~confident).mean()), 4),
        "heldout_slices": slice_accuracy(held, hits),
        "finetune_seconds": round(tuned.seconds, 1),
        "finetune_history": tuned.history,
        "fallback_value": fallback_value,
    }
    detector = None
    if followups:
        report("fitting the follow-up detector")
        x_tasks = embedder.encode([r.prompt for r in train_tasks])
        detector = FollowupDetector.fit(embedder.encode([r.prompt for r in follow_train]), x_tasks)
        if follow_held:
            caught = detector.is_followup(embedder.encode([r.prompt for r in follow_held]))
            metrics["heldout_followups_detected"] = round(float(caught.mean()), 4)
            metrics["heldout_followups_n"] = len(follow_held)
        metrics["heldout_tasks_taken_for_followups"] = round(
            float(detector.is_followup(x_held).mean()), 4
        )
        if switched_held:
            x_switched = embedder.encode([r.prompt for r in switched_held])
            metrics["heldout_opened_tasks_taken_for_followups"] = round(
                float(detector.is_followup(x_switched).mean()), 4
            )
    artifact = RouterArtifact(
        path=None,
        embedder=describe(embedder) | {"model": ENCODER_DIR, "base_model": model},  # type: ignore[arg-type]
        classifier=classifier,
        threshold=threshold,
        training={
            "file": source,
            "n": len(rows),
            "sha256": data_hash(rows),
            "counts": counts,
            "followups": len(followups or []),
            "finetune": settings.model_dump(),
        },
        metrics=metrics,
        followup=detector,
    )
    out.mkdir(parents=True, exist_ok=True)
    target = out / ENCODER_DIR
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    artifact.save(out)
    return artifact
