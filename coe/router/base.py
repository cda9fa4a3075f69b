"""What every router gives the orchestrator: a RouteDecision for a conversation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from coe.engines.base import Message


@dataclass(frozen=True)
class RouteDecision:
    expert: str
    category: str | None
    confidence: float | None
    fell_back: bool
    reason: str
    latency_s: float = 0.0
    # The runner-up categories with their probabilities, best first (the winner not included).
    alternatives: tuple[tuple[str, float], ...] = ()
    # The category's prompt strategy as applied (coe.prompts.strategies): its name, the
    # mixture-of-prompts region, the expert identity and where that came from.
    strategy: str = "none"
    region: int | None = None
    identity: str | None = None
    identity_source: str | None = None
    # The latest user turn continues an earlier task ("now make it shorter") and was routed
    # with it; False for a one-turn conversation or a turn that starts a new task.
    continues: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["alternatives"] = [{"category": c, "probability": p} for c, p in self.alternatives]
        return out


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
