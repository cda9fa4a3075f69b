"""Stage two of routing: embedding -> category probabilities, with scikit-learn.

``logreg`` (default): multinomial logistic regression; its logits are divided by a temperature
fitted on held-out folds, so a probability of 0.8 means right about 80% of the time.
``knn``: distance-weighted k nearest neighbours by cosine, as Samba-CoE's router does.

Saved as plain arrays (``.npz`` loaded with ``allow_pickle=False``) plus JSON, never pickle: a
router folder can be shared and loaded without running anyone's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

Kind = Literal["logreg", "knn"]


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
    kind: Kind
    categories: list[str]
    params: dict[str, Any]
    temperature: float = 1.0
    _model: Any = field(default=None, repr=False)

    @classmethod
    def fit(
        cls, x: np.ndarray, labels: list[str], kind: Kind = "logreg", **params: Any
    ) -> CategoryClassifier:
        categories = sorted(set(labels))
        y = np.array([categories.index(c) for c in labels])
        if kind == "logreg":
            params = {"C": 10.0} | params
            model = LogisticRegression(C=params["C"], max_iter=5000)
        elif kind == "knn":
            params = {"k": 10} | params
            model = KNeighborsClassifier(
                n_neighbors=min(params["k"], len(y)), weights="distance", metric="cosine"
            )
        else:
            raise ValueError(f"unknown classifier kind {kind!r} (logreg or knn)")
        model.fit(x, y)
        return cls(kind=kind, categories=categories, params=params, _model=model)

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.kind != "logreg":
            raise TypeError("only logreg has logits")
        scores = np.asarray(self._model.decision_function(x), dtype=np.float64)
        if scores.ndim == 1:  # two categories: one score d; softmax([-d/2, d/2]) = sigmoid(d)
            scores = np.column_stack([-scores / 2, scores / 2])
        return scores

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities, one column per ``self.categories`` entry."""
        x = np.atleast_2d(x)
        if self.kind == "logreg":
            return softmax(self.logits(x) / self.temperature)
        proba = np.zeros((len(x), len(self.categories)))
        proba[:, self._model.classes_] = self._model.predict_proba(x)
        return proba

    # -- safe serialisation ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.kind == "logreg":
            return {"coef": self._model.coef_, "intercept": self._model.intercept_}
        return {"train_x": self._model._fit_X, "train_y": self._model._y}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "params": self.params,
            "temperature": self.temperature,
            "categories": self.categories,
        }

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> CategoryClassifier:
        kind, categories = meta["kind"], list(meta["categories"])
        if kind == "logreg":
            model = LogisticRegression()
            model.classes_ = np.arange(len(categories))
            model.coef_ = arrays["coef"]
            model.intercept_ = arrays["intercept"]
            if model.coef_.shape[0] != (1 if len(categories) == 2 else len(categories)):
                raise ValueError("coef rows do not match the number of categories")
        elif kind == "knn":
            train_y = arrays["train_y"].astype(int)
            model = KNeighborsClassifier(
                n_neighbors=min(int(meta["params"]["k"]), len(train_y)),
                weights="distance",
                metric="cosine",
            )
            model.fit(arrays["train_x"], train_y)
        else:
            raise ValueError(f"unknown classifier kind {kind!r}")
        return cls(
            kind=kind,
            categories=categories,
            params=dict(meta["params"]),
            temperature=float(meta.get("temperature", 1.0)),
            _model=model,
        )
