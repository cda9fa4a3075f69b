"""What every router gives the orchestrator: a RouteDecision for a conversation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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
