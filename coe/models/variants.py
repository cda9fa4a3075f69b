"""Expert variants of a prepared model: same architecture, different weights.

Only one real LLM ships offline, so tests and benchmarks make their own "fine-tunes" of it: every
floating-point tensor is scaled by (1 + scale * noise) with noise drawn from a seeded generator.
The result is a new checkpoint folder that shares the base's architecture signature (so it can
swap into the same slot) but answers differently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS = "model.safetensors"


def make_variant(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """Write a perturbed copy of `base` (a prepared model folder) to `out`; idempotent."""
    out = Path(out)
    done = out / ".coe-variant"
    tag = f"{base.resolve()} seed={seed} scale={scale}"
    if done.exists() and done.read_text() == tag:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(base).iterdir():
        if item.is_file() and item.name not in (WEIGHTS, "coe-manifest.json"):
            shutil.copyfile(item, out / item.name)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(base) / WEIGHTS), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = handle.get_tensor(name)
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor = (tensor.float() * (1.0 + scale * noise)).to(tensor.dtype)
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    done.write_text(tag)
    return out


def prepared_variant(seed: int, base_name: str = "gemma-3-270m") -> Path:
    """A variant of a prepared model under COE_HOME (built once, then reused)."""
    from coe.models.prepare import prepare_model
    from coe.paths import exclusive_lock, models_dir

    base = prepare_model(base_name)
    out = models_dir() / f"{base_name}-variant-{seed}"
    with exclusive_lock(models_dir() / f".{out.name}.lock"):
        return make_variant(base, out, seed)
