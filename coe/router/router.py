"""Two-stage routing: embedding -> classifier -> category, then category -> expert.

A conversation is routed as a whole: its user turns are joined and embedded together, so the
opening request sets the category and a follow-up ("now make it shorter") does not flip it. The
embedder keeps the start and the end of a long text, i.e. the first request and the latest one.
The last turn alone is a poor signal: a bare "make it shorter" reads as a writing request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from coe.config import PoolConfig
from coe.engines.base import Message
from coe.router.artifact import RouterArtifact, RouterArtifactError, load_artifact
from coe.router.base import Embedder, RouteDecision
from coe.router.embed import load_embedder

ALTERNATIVES = 3


def check_compatible(artifact: RouterArtifact, embedder: Embedder, config: PoolConfig) -> None:
    where = artifact.path or "router"
    trained = artifact.embedder
    if trained["fingerprint"] != embedder.fingerprint or trained["dim"] != embedder.dim:
        raise RouterArtifactError(
            f"{where}: fitted on embeddings of {trained['model']} (fingerprint "
            f"{trained['fingerprint']}, {trained['dim']} dims), but the embedder here is "
            f"{embedder.model_id} (fingerprint {embedder.fingerprint}, {embedder.dim} dims); "
            "refit with `coe router fit` or use the same embedding model"
        )
    missing = [c for c in artifact.categories if c not in config.category_names]
    if missing:
        raise RouterArtifactError(
            f"{where}: predicts categories that {config.source or 'experts.yaml'} lacks: "
            f"{', '.join(missing)}; add them under `categories:` (each with an expert) or refit "
            "the router on data without them"
        )


class TwoStageRouter:
    def __init__(
        self,
        artifact: RouterArtifact,
        embedder: Embedder,
        config: PoolConfig,
        threshold: float | None = None,
    ):
        check_compatible(artifact, embedder, config)
        self.artifact = artifact
        self.embedder = embedder
        self.config = config
        self.categories = artifact.categories
        self.fallback = config.router.fallback
        self.threshold = artifact.threshold if threshold is None else threshold
        self.expert_of = {c.name: c.expert for c in config.categories}

    @classmethod
    def from_config(
        cls,
        config: PoolConfig,
        folder: Path | None = None,
        backend: str | None = None,
        embedder: Embedder | None = None,
    ) -> TwoStageRouter:
        """The router in FOLDER (default: experts.yaml's router.path), embedding as it was fitted
        unless BACKEND says otherwise."""
        if folder is None and config.router.path is None:
            raise RouterArtifactError(
                f"{config.source or 'experts.yaml'}: no router.path configured; "
                "pass a router folder"
            )
        artifact = load_artifact(folder or router_dir(config))
        return cls(
            artifact,
            embedder or load_embedder(artifact.embedder_settings(backend=backend)),
            config,
            threshold=config.router.threshold,
        )

    # -- stage one and two -------------------------------------------------------------------
    def classify(self, texts: Sequence[str]) -> np.ndarray:
        """Category probabilities for each text (columns in ``self.categories`` order)."""
        return self.artifact.classifier.predict_proba(self.embedder.encode(texts))

    def conversation_proba(self, messages: Sequence[Message]) -> np.ndarray:
        users = [m.content for m in messages if m.role == "user" and m.content.strip()]
        if not users:
            raise ValueError("the conversation has no user message")
        return self.classify(["\n\n".join(users)])[0]

    def route(self, messages: Sequence[Message]) -> RouteDecision:
        t0 = time.perf_counter()
        proba = self.conversation_proba(messages)
        order = np.argsort(-proba)
        best = self.categories[order[0]]
        confidence = float(proba[order[0]])
        alternatives = tuple(
            (self.categories[i], round(float(proba[i]), 4)) for i in order[1 : 1 + ALTERNATIVES]
        )
        if confidence < self.threshold:
            category = self.fallback
            reason = (
                f"best guess {best} at {confidence:.2f} is below the threshold "
                f"{self.threshold:.2f}: fallback category"
            )
        else:
            category = best
            reason = f"classified as {best}"
        return RouteDecision(
            expert=self.expert_of[category],
            category=category,
            confidence=round(confidence, 4),
            fell_back=category != best,
            reason=reason,
            latency_s=time.perf_counter() - t0,
            alternatives=alternatives
            if category == best
            else ((best, round(confidence, 4)), *alternatives[: ALTERNATIVES - 1]),
        )


def router_dir(config: PoolConfig) -> Path:
    assert config.router.path is not None
    path = Path(config.router.path).expanduser()
    if not path.is_absolute() and config.source is not None:
        path = config.source.parent / path
    return path
