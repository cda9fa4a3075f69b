"""Stage two of routing: embedding -> category probabilities.

CategoryClassifier holds what every kind shares: the category names, the temperature, the
hyper-parameters and the file format. The model itself is one of the kinds in
``coe.router.classifiers.registry`` (``logreg``, ``knn``, ...).

Saved as plain arrays (``.npz`` loaded with ``allow_pickle=False``) plus JSON, never pickle: a
router folder can be shared and loaded without running anyone's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coe.router.base import Classifier
from coe.router.classifiers.registry import classifier_kind


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of held-out predictions."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = softmax(logits / np.exp(log_t))
        return float(-np.mean(np.log(p[np.arange(len(labels)), labels] + 1e-12)))

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(best.x))


@dataclass
class CategoryClassifier:
    kind: str
    categories: list[str]
    params: dict[str, Any]
    model: Classifier = field(repr=False)
    temperature: float = 1.0

    @classmethod
    def fit(
        cls, x: np.ndarray, labels: list[str], kind: str = "logreg", **params: Any
    ) -> CategoryClassifier:
        model_kind = classifier_kind(kind)
        categories = sorted(set(labels))
        y = np.array([categories.index(c) for c in labels])
        params = model_kind.defaults | params
        model = model_kind.fit(x, y, len(categories), params)
        return cls(kind=kind, categories=categories, params=params, model=model)

    @property
    def gives_logits(self) -> bool:
        return self.model.gives_logits

    def logits(self, x: np.ndarray) -> np.ndarray:
        if not self.gives_logits:
            raise TypeError(f"{self.kind} has no logits")
        return self.model.scores(x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities, one column per ``self.categories`` entry."""
        x = np.atleast_2d(x)
        if self.gives_logits:
            return softmax(self.logits(x) / self.temperature)
        return self.model.scores(x)

    # -- safe serialisation ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return self.model.to_arrays()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "params": self.params,
            "temperature": self.temperature,
            "categories": self.categories,
        }

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> CategoryClassifier:
        kind, categories, params = meta["kind"], list(meta["categories"]), dict(meta["params"])
        model = classifier_kind(kind).from_arrays(arrays, len(categories), params)
        return cls(
            kind=kind,
            categories=categories,
            params=params,
            model=model,
            temperature=float(meta.get("temperature", 1.0)),
        )
