"""What every router gives the orchestrator (a RouteDecision for a conversation), and what its
parts are: an Embedder (texts -> vectors) and a Classifier (vectors -> category scores)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, Self

import numpy as np

from coe.types import Message, RouteDecision


class Router(Protocol):
    def route(self, messages: Sequence[Message]) -> RouteDecision: ...

    # True when route() tells a follow-up turn from a new task (RouteDecision.continues);
    # a gateway session then re-routes a new task instead of keeping its expert.
    @property
    def tells_followups(self) -> bool: ...


class Embedder(Protocol):
    """Texts in, L2-normalised embeddings out (one row per text, float32)."""

    model_id: str
    fingerprint: str
    dim: int
    backend: str
    max_seq_length: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class Classifier(Protocol):
    """Stage two of routing: embeddings in, one score column per category out.

    Each kind is one module in coe/router/classifiers/ and one line of its registry; the
    category names, the temperature and the file format stay with CategoryClassifier.
    """

    # Hyper-parameters used when not given, and the sets cross-validation chooses from.
    defaults: ClassVar[dict[str, Any]]
    grid: ClassVar[tuple[dict[str, Any], ...]]
    # True: scores are logits, made probabilities by a softmax at a temperature fitted on
    # held-out predictions. False: scores are probabilities already (temperature 1).
    gives_logits: ClassVar[bool]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, categories: int, params: dict[str, Any]) -> Self:
        """Fit on embeddings ``x`` and category indices ``y`` (0 .. categories - 1)."""
        ...

    def scores(self, x: np.ndarray) -> np.ndarray:
        """One row per embedding, one column per category."""
        ...

    # Plain arrays (saved with NumPy, loaded without pickle) and back.
    def to_arrays(self) -> dict[str, np.ndarray]: ...

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], categories: int, params: dict[str, Any]
    ) -> Self: ...
