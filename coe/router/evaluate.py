"""Measure a router on labelled prompts.

- strict accuracy: the top category is the label;
- coarse accuracy: the top category is in the label's group (writing, roleplay, humanities ->
  writing; math, reasoning, stem -> math; coding, extraction -> coding). Arena-Hard labels only
  the three groups, so this is its headline figure;
- expert accuracy: the expert the request really reaches (after the fallback threshold) is the
  expert the pool maps the label to;
- macro-F1, per-category precision and recall, the confusion matrix;
- expected calibration error (strict, and coarse with the group's summed probability);
- accuracy against coverage: answering only above each confidence threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from coe.router.data import LabelledPrompt
from coe.router.router import TwoStageRouter
from coe.router.train import expected_calibration_error

# The three kinds of answer a pool usually has experts for; MT-Bench's eight categories fold
# into them, and Arena-Hard v2.0 labels only these (creative_writing, math, coding).
COARSE = {
    "writing": "writing",
    "roleplay": "writing",
    "humanities": "writing",
    "math": "math",
    "reasoning": "math",
    "stem": "math",
    "coding": "coding",
    "extraction": "coding",
}
COVERAGE_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def coarse(category: str) -> str:
    return COARSE.get(category, category)


@dataclass
class EvalReport:
    accuracy: float
    macro_f1: float
    per_category: dict[str, dict[str, float]]
    n: int
    labels: list[str]
    confusion: list[list[int]]
    # How often the router's confidence was below its threshold (the request would go to the
    # fallback category), and the accuracy once those count as misses.
    fallback_rate: float
    accuracy_with_fallback: float
    coarse_accuracy: float = 0.0
    # None where no label of the data names a category of the pool (nothing to map).
    expert_accuracy: float | None = None
    ece: float = 0.0
    coarse_ece: float = 0.0
    threshold: float = 0.0
    # [{"threshold", "coverage", "accuracy"}]: answering only at or above each confidence.
    coverage: list[dict[str, float | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "coarse_accuracy": self.coarse_accuracy,
            "expert_accuracy": self.expert_accuracy,
            "ece": self.ece,
            "coarse_ece": self.coarse_ece,
            "threshold": self.threshold,
            "coverage": self.coverage,
            "macro_f1": self.macro_f1,
            "per_category": self.per_category,
            "n": self.n,
            "fallback_rate": self.fallback_rate,
            "accuracy_with_fallback": self.accuracy_with_fallback,
            "confusion": {"labels": self.labels, "matrix": self.confusion},
        }


def evaluate(router: TwoStageRouter, rows: list[LabelledPrompt]) -> EvalReport:
    """Scores the classifier's top category against each row's label.

    Labels the router does not know still count (as misses), so a data set with foreign labels
    scores low instead of silently shrinking.
    """
    proba = router.classify([r.prompt for r in rows])
    predicted = [router.categories[i] for i in proba.argmax(1)]
    truth = [r.category for r in rows]
    confident = proba.max(1) >= router.threshold
    eval_labels = sorted(set(truth))
    labels = eval_labels + sorted(set(predicted) - set(eval_labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=eval_labels, zero_division=0
    )
    per_category = {
        c: {
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(support[i]),
        }
        for i, c in enumerate(eval_labels)
    }
    hits = np.array([p == t for p, t in zip(predicted, truth, strict=True)])
    conf = proba.max(1)
    cats = router.categories
    groups = sorted({coarse(c) for c in cats})
    group_proba = np.column_stack(
        [proba[:, [i for i, c in enumerate(cats) if coarse(c) == g]].sum(1) for g in groups]
    )
    coarse_truth = [coarse(t) for t in truth]
    coarse_hits = np.array([coarse(p) == t for p, t in zip(predicted, coarse_truth, strict=True)])
    group_y = np.array([groups.index(t) if t in groups else -1 for t in coarse_truth])
    routed = [p if ok else router.fallback for p, ok in zip(predicted, confident, strict=True)]
    mapped = [i for i, t in enumerate(truth) if t in router.expert_of]
    expert_accuracy = (
        round(
            float(
                np.mean([router.expert_of[routed[i]] == router.expert_of[truth[i]] for i in mapped])
            ),
            4,
        )
        if mapped
        else None
    )
    strict_y = np.array([cats.index(t) if t in cats else -1 for t in truth])
    coverage = []
    for t in sorted({*COVERAGE_THRESHOLDS, round(router.threshold, 4)}):
        kept = conf >= t
        coverage.append(
            {
                "threshold": t,
                "coverage": round(float(kept.mean()), 4),
                "accuracy": round(float(hits[kept].mean()), 4) if kept.any() else None,
                "coarse_accuracy": round(float(coarse_hits[kept].mean()), 4)
                if kept.any()
                else None,
            }
        )
    return EvalReport(
        accuracy=round(float(accuracy_score(truth, predicted)), 4),
        macro_f1=round(float(f1_score(truth, predicted, labels=eval_labels, average="macro")), 4),
        per_category=per_category,
        n=len(rows),
        labels=labels,
        confusion=confusion_matrix(truth, predicted, labels=labels).tolist(),
        fallback_rate=round(float((~confident).mean()), 4),
        accuracy_with_fallback=round(float((hits & confident).mean()), 4),
        coarse_accuracy=round(float(coarse_hits.mean()), 4),
        expert_accuracy=expert_accuracy,
        ece=round(expected_calibration_error(proba, strict_y), 4),
        coarse_ece=round(expected_calibration_error(group_proba, group_y), 4),
        threshold=round(router.threshold, 4),
        coverage=coverage,
    )


def plot_coverage(report: EvalReport, path: Path | str, title: str = "") -> Path:
    """Accuracy against coverage as the confidence threshold moves, the router's own marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in report.coverage if p["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for key, label in (("accuracy", "strict"), ("coarse_accuracy", "coarse")):
        ax.plot([p["coverage"] for p in points], [p[key] for p in points], marker="o", label=label)
    own = next((p for p in points if p["threshold"] == report.threshold), None)
    if own is not None:
        ax.annotate(
            f"threshold {report.threshold:.2f}",
            (own["coverage"], own["accuracy"]),
            textcoords="offset points",
            xytext=(-10, -18),
            ha="right",
        )
    ax.set_xlabel("coverage (share answered by the routed specialist)")
    ax.set_ylabel("accuracy on those")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title or f"accuracy against coverage (ECE {report.ece:.3f})")
    return _save(fig, path)


def plot_confusion(report: EvalReport, path: Path | str, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(report.confusion)
    n = len(report.labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.65 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(n), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() or 1
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                color = "white" if matrix[i, j] > top / 2 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color)
    ax.set_title(title or f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}")
    return _save(fig, path)


def _save(fig: Any, path: Path | str) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
