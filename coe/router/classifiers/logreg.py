"""``logreg`` (the default): multinomial logistic regression. Its scores are logits, divided by a
temperature fitted on held-out folds, so a probability of 0.8 means right about 80% of the time.
A fine-tuned router's linear head is saved as one of these."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class LogisticRegressionClassifier:
    defaults: ClassVar[dict[str, Any]] = {"C": 10.0}
    grid: ClassVar[tuple[dict[str, Any], ...]] = tuple(
        {"C": c} for c in (1.0, 3.0, 10.0, 30.0, 100.0)
    )
    gives_logits: ClassVar[bool] = True

    def __init__(self, model: Any):
        self.model = model  # a fitted sklearn LogisticRegression

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, categories: int, params: dict[str, Any]
    ) -> LogisticRegressionClassifier:
        from sklearn.linear_model import LogisticRegression

        return cls(LogisticRegression(C=params["C"], max_iter=5000).fit(x, y))

    def scores(self, x: np.ndarray) -> np.ndarray:
        scores = np.asarray(self.model.decision_function(x), dtype=np.float64)
        if scores.ndim == 1:  # two categories: one score d; softmax([-d/2, d/2]) = sigmoid(d)
            scores = np.column_stack([-scores / 2, scores / 2])
        return scores

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.model.coef_, "intercept": self.model.intercept_}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], categories: int, params: dict[str, Any]
    ) -> LogisticRegressionClassifier:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression()
        model.classes_ = np.arange(categories)
        model.coef_ = arrays["coef"]
        model.intercept_ = arrays["intercept"]
        if model.coef_.shape[0] != (1 if categories == 2 else categories):
            raise ValueError("coef rows do not match the number of categories")
        return cls(model)
