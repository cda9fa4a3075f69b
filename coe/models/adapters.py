"""LoRA adapters of a prepared model, made locally (tests and benchmarks: no hub download).

These adapters are seeded random LoRA weights (B nonzero, so the answers change; built in
seconds, for config tests and benchmarks), each with its merged checkpoint (peft's
merge_and_unload): an adapter expert answers right when its greedy answers are the merged
checkpoint's on a plain engine. Adapters trained to a checkable effect (a marker at the start of
every answer) are coe.models.marker_adapters. Needs `peft` (the `dev` extra).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS = "adapter_model.safetensors"


def make_adapter(
    base: Path,
    out: Path,
    seed: int,
    *,
    rank: int = 8,
    std: float = 0.02,
    merged_dtype: str = "float32",
) -> Path:
    """Write a seeded random LoRA adapter of `base` to `out/adapter` and its merged checkpoint to
    `out/merged` (at `merged_dtype`); idempotent. Returns `out`."""
    out = Path(out)
    done = out / ".coe-adapter"
    tag = f"{Path(base).resolve()} seed={seed} rank={rank} std={std} merged={merged_dtype}"
    if done.exists() and done.read_text() == tag:
        return out
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(rank))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # zero by default: the adapter would change nothing
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    save_adapter_and_merged(peft_model, Path(base), out, merged_dtype)
    done.write_text(tag)
    return out


def lora_config(rank: int) -> Any:
    """The LoRA layout of coe's test adapters: every attention and MLP projection."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(TARGETS),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def save_adapter_and_merged(peft_model: Any, base: Path, out: Path, merged_dtype: str) -> None:
    """Write `out/adapter` (PEFT, safetensors) and `out/merged`: the checkpoint the adapter is
    equivalent to (peft's merge_and_unload, at `merged_dtype`), with the base's tokenizer files."""
    import torch

    if out.exists():
        shutil.rmtree(out)
    peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    merged = peft_model.merge_and_unload().to(getattr(torch, merged_dtype))
    merged.save_pretrained(out / "merged", safe_serialization=True)
    for item in base.iterdir():
        if item.name.startswith("tokenizer") or item.name in (
            "generation_config.json",
            "chat_template.jinja",
        ):
            shutil.copyfile(item, out / "merged" / item.name)


def prepared_adapter(seed: int, base_name: str = "gemma-3-270m", *, rank: int = 8) -> Path:
    """A seeded adapter of a prepared model under COE_HOME (built once, then reused): the folder
    holds `adapter/` (PEFT, safetensors) and `merged/` (the checkpoint it is equivalent to)."""
    from coe.models.prepare import prepare_model
    from coe.paths import exclusive_lock, models_dir

    base = prepare_model(base_name)
    out = models_dir() / f"{base_name}-lora-{seed}-r{rank}"
    with exclusive_lock(models_dir() / f".{out.name}.lock"):
        return make_adapter(base, out, seed, rank=rank)
