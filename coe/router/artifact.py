"""A fitted router on disk: ``router.json`` (metadata, readable) + ``weights.npz`` (arrays),
and for a fine-tuned router ``encoder/`` (its int8 ONNX graph and tokenizer).

All are inert data: JSON, NumPy arrays loaded with ``allow_pickle=False``, and ONNX.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coe import __version__
from coe.errors import ConfigurationError
from coe.router.classifier import CategoryClassifier
from coe.router.embed import EmbedderSettings
from coe.router.followup import FollowupDetector

FORMAT = "coe-router/1"
META_FILE = "router.json"
WEIGHTS_FILE = "weights.npz"


class RouterArtifactError(ConfigurationError, ValueError):
    pass


@dataclass
class RouterArtifact:
    path: Path | None
    embedder: dict[str, Any]
    classifier: CategoryClassifier
    threshold: float
    training: dict[str, Any]
    metrics: dict[str, Any]
    coe_version: str = __version__
    created: str = ""
    # Tells a turn that continues the conversation ("now make it shorter") from a new task.
    followup: FollowupDetector | None = None

    @property
    def categories(self) -> list[str]:
        return self.classifier.categories

    def embedder_settings(self, **overrides: Any) -> EmbedderSettings:
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("backend") == "torch":
            given.setdefault("tail_tokens", 0)  # the torch path cannot keep a text's tail
        model = self.embedder["model"]
        if self.path is not None and (self.path / model).is_dir():
            model = str(self.path / model)  # a fine-tuned encoder shipped inside the folder
        return EmbedderSettings(
            model=model,
            backend=self.embedder["backend"],
            max_seq_length=self.embedder["max_seq_length"],
            tail_tokens=self.embedder.get("tail_tokens", 0),
        ).model_copy(update=given)

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "coe_version": self.coe_version,
            "created": self.created,
            "embedder": self.embedder,
            "classifier": self.classifier.describe(),
            "threshold": self.threshold,
            "training": self.training,
            "metrics": self.metrics,
        } | ({"followup": self.followup.describe()} if self.followup else {})

    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.created = self.created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        tmp_weights = folder / f".{WEIGHTS_FILE}.tmp.npz"
        arrays = self.classifier.to_arrays()
        if self.followup is not None:
            arrays |= self.followup.to_arrays()
        np.savez(tmp_weights, **arrays)
        tmp_meta = folder / f".{META_FILE}.tmp"
        tmp_meta.write_text(json.dumps(self.meta(), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp_weights, folder / WEIGHTS_FILE)
        os.replace(tmp_meta, folder / META_FILE)
        self.path = folder
        return folder


def load_artifact(folder: Path | str) -> RouterArtifact:
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for f in (meta_path, weights_path):
        if not f.exists():
            raise RouterArtifactError(
                f"{folder}: no {f.name}; fit a router there with `coe router fit DATA.jsonl "
                f"--out {folder}`"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise RouterArtifactError(f"{meta_path}: not valid JSON ({exc.msg})") from None
    if meta.get("format") != FORMAT:
        raise RouterArtifactError(
            f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}; refit the router "
            "with this version of coe"
        )
    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        classifier = CategoryClassifier.from_arrays(meta["classifier"], arrays)
        followup = (
            FollowupDetector.from_arrays(meta["followup"], arrays) if "followup" in meta else None
        )
    except (KeyError, ValueError, OSError) as exc:
        raise RouterArtifactError(f"{folder}: damaged router weights ({exc})") from None
    return RouterArtifact(
        path=folder,
        embedder=meta["embedder"],
        classifier=classifier,
        threshold=float(meta["threshold"]),
        training=meta.get("training", {}),
        metrics=meta.get("metrics", {}),
        coe_version=meta.get("coe_version", "?"),
        created=meta.get("created", ""),
        followup=followup,
    )
