"""``knn``: distance-weighted k nearest neighbours by cosine, as Samba-CoE's router does. Its
scores are probabilities already; it keeps the training embeddings as its weights."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class NearestNeighboursClassifier:
    defaults: ClassVar[dict[str, Any]] = {"k": 10}
    grid: ClassVar[tuple[dict[str, Any], ...]] = tuple({"k": k} for k in (5, 10, 20, 40))
    gives_logits: ClassVar[bool] = False

    def __init__(self, model: Any, categories: int):
        self.model = model  # a fitted sklearn KNeighborsClassifier
        self.categories = categories

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, categories: int, params: dict[str, Any]
    ) -> NearestNeighboursClassifier:
        from sklearn.neighbors import KNeighborsClassifier

        model = KNeighborsClassifier(
            n_neighbors=min(int(params["k"]), len(y)), weights="distance", metric="cosine"
        )
        return cls(model.fit(x, y), categories)

    def scores(self, x: np.ndarray) -> np.ndarray:
        # A category absent from the training rows keeps probability 0.
        proba = np.zeros((len(x), self.categories))
        proba[:, self.model.classes_] = self.model.predict_proba(x)
        return proba

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"train_x": self.model._fit_X, "train_y": self.model._y}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], categories: int, params: dict[str, Any]
    ) -> NearestNeighboursClassifier:
        return cls.fit(arrays["train_x"], arrays["train_y"].astype(int), categories, params)
