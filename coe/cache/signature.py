"""Architecture signatures: two checkpoints with the same signature can share one engine.

The signature covers what shapes the engine's memory: the model config (minus bookkeeping keys),
every tensor's name, shape and dtype from the safetensors headers, and the quantization config.
Reading headers is cheap (a few KB per file), so the signature is computed at startup.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from coe.cache.checkpoint import CheckpointFormatError, safetensors_header
from coe.errors import ConfigurationError

# Config keys that do not change the engine's layout.
_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


class SignatureError(ConfigurationError, ValueError):
    """A checkpoint folder cannot be read well enough to know its architecture."""


def architecture_signature(folder: Path | str, dtype: str) -> str:
    """A short hash; equal for checkpoints that fit the same engine at the same dtype."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SignatureError(
            f"{folder}/config.json: cannot read the model config ({exc})"
        ) from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SignatureError(f"{folder}: no *.safetensors files (coe swaps safetensors only)")
    tensors: dict[str, Any] = {}
    for file in files:
        try:
            header = safetensors_header(file)
        except CheckpointFormatError as exc:
            raise SignatureError(str(exc)) from None
        for name, info in header.items():
            tensors[name] = [info.get("dtype"), info.get("shape")]
    described = {
        "config": {k: v for k, v in sorted(config.items()) if k not in _BOOKKEEPING},
        "tensors": dict(sorted(tensors.items())),
        "dtype": dtype,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return f"{config.get('model_type', 'model')}-{digest[:12]}"
