"""Two-stage routing: embedding -> classifier -> category, then category -> expert.

A conversation is routed by the task its latest turn belongs to. A router with a follow-up
detector (``coe.router.followup``) walks back from the latest user turn over the follow-ups
("now make it shorter", "and in French?") to the turn that set the task, and classifies that one:
a follow-up keeps the conversation's category, a new task ("different question: ...") gets its
own. A bare "make it shorter" classified alone would read as a writing request. A router without
the detector joins the user turns and embeds them together (head and tail: the first request and
the latest one).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coe.config import PoolConfig
from coe.router.artifact import RouterArtifact, RouterArtifactError, load_artifact
from coe.router.base import Embedder
from coe.router.embed import load_embedder
from coe.types import Message, RouteDecision

ALTERNATIVES = 3
# Turns looked at when walking back to a conversation's task (all embedded in one batch).
TURNS_LOOKED_AT = 8


@dataclass(frozen=True)
class _Task:
    proba: np.ndarray
    note: str | None = None  # how the task was found in a conversation of several turns
    continues: bool = False  # the latest turn is a follow-up of an earlier one


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

    @property
    def tells_followups(self) -> bool:
        """Whether a follow-up turn is told from a new task (see ``coe.router.followup``)."""
        return self.artifact.followup is not None

    # -- stage one and two -------------------------------------------------------------------
    def classify(self, texts: Sequence[str]) -> np.ndarray:
        """Category probabilities for each text (columns in ``self.categories`` order)."""
        return self.artifact.classifier.predict_proba(self.embedder.encode(texts))

    def conversation_proba(self, messages: Sequence[Message]) -> np.ndarray:
        return self._task_proba(messages).proba

    def _task_proba(self, messages: Sequence[Message]) -> _Task:
        """Category probabilities of the conversation's current task, and how it was found."""
        users = [m.content for m in messages if m.role == "user" and m.content.strip()]
        if not users:
            raise ValueError("the conversation has no user message")
        if len(users) == 1:
            return _Task(self.classify(users)[0])
        detector = self.artifact.followup
        if detector is None:
            return _Task(self.classify(["\n\n".join(users)])[0], "the user turns, joined")
        turns = users[-TURNS_LOOKED_AT:]
        x = self.embedder.encode(turns)
        follows = detector.is_followup(x)
        task = len(turns) - 1
        while task > 0 and follows[task]:
            task -= 1
        proba = self.artifact.classifier.predict_proba(x[task : task + 1])[0]
        if task == len(turns) - 1:
            return _Task(proba, "the latest turn starts a new task")
        back = len(turns) - 1 - task
        return _Task(proba, f"a follow-up: routed with the task {back} user turn(s) back", True)

    def route(self, messages: Sequence[Message]) -> RouteDecision:
        t0 = time.perf_counter()
        found = self._task_proba(messages)
        proba = found.proba
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
        if found.note:
            reason = f"{reason} ({found.note})"
        return RouteDecision(
            expert=self.expert_of[category],
            category=category,
            confidence=round(confidence, 4),
            fell_back=category != best,
            reason=reason,
            latency_s=time.perf_counter() - t0,
            continues=found.continues,
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
