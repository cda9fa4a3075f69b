"""Measure a router on labelled prompts: accuracy, macro-F1, per-category scores, confusion."""

from __future__ import annotations

from dataclasses import dataclass
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
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
    return EvalReport(
        accuracy=round(float(accuracy_score(truth, predicted)), 4),
        macro_f1=round(float(f1_score(truth, predicted, labels=eval_labels, average="macro")), 4),
        per_category=per_category,
        n=len(rows),
        labels=labels,
        confusion=confusion_matrix(truth, predicted, labels=labels).tolist(),
        fallback_rate=round(float((~confident).mean()), 4),
        accuracy_with_fallback=round(float((hits & confident).mean()), 4),
    )


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
