"""Build the fast embedding graph once: export to ONNX, fuse, quantize to int8.

The graph takes token ids and the attention mask and returns the pooled, normalised embedding,
so the runtime path is tokenizer -> one ONNX Runtime call. Built under a lock into a staging file
and renamed into place, so a half-written graph is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from coe.paths import embedders_dir, exclusive_lock

log = logging.getLogger(__name__)

GRAPH_NAME = "model.int8.onnx"
# Bump when the export recipe changes, so caches built by an older recipe are rebuilt.
RECIPE = "v1"


def onnx_model_path(fingerprint: str) -> Path:
    return embedders_dir() / f"{fingerprint}-{RECIPE}" / GRAPH_NAME


def ensure_onnx_model(model_dir: Path, fingerprint: str) -> Path:
    target = onnx_model_path(fingerprint)
    if target.exists():
        return target
    with exclusive_lock(target.parent.parent / f".{target.parent.name}.lock"):
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("building the int8 ONNX embedder for %s into %s", model_dir, target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            staged = build_onnx_graph(model_dir, Path(tmp))
            os.replace(staged, target)
    return target


def pooling_of(model_dir: Path) -> tuple[str, bool]:
    """(mean | cls, normalise?) as the sentence-transformers model's modules.json says."""
    modules = (
        json.loads((model_dir / "modules.json").read_text())
        if (model_dir / "modules.json").exists()
        else []
    )
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    mode = "mean"
    pooling_cfg = model_dir / "1_Pooling" / "config.json"
    if pooling_cfg.exists():
        cfg = json.loads(pooling_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif not cfg.get("pooling_mode_mean_tokens", True):
            raise RuntimeError(
                f"{pooling_cfg}: only mean or CLS pooling can be exported to ONNX; "
                "use the torch backend for this model"
            )
    return mode, normalize


def pool_hidden(hidden: Any, attention_mask: Any, mode: str, normalize: bool) -> Any:
    """The sentence embedding from an encoder's token states (torch tensors): mean over the
    real tokens or the CLS token, then L2 norm if the model has it. Fine-tuning uses this too,
    so that the trained head sees exactly what the exported graph computes."""
    import torch

    if mode == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def build_onnx_graph(model_dir: Path, work: Path) -> Path:
    """Export MODEL_DIR's encoder with its pooling, fuse and quantize it; the graph is WORK's."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig, AutoModel

    from coe.router.embed import quiet_transformers

    quiet_transformers()
    mode, normalize = pooling_of(model_dir)
    # Eager attention exports as plain MatMul/Softmax, which ONNX Runtime fuses into its
    # Attention kernel; the SDPA export does not fuse.
    encoder = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    config = AutoConfig.from_pretrained(str(model_dir))

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            return pool_hidden(hidden, attention_mask, mode, normalize)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = torch.ones(2, 16, dtype=torch.long)
    work.mkdir(parents=True, exist_ok=True)
    raw, fused, quant = work / "raw.onnx", work / "fused.onnx", work / GRAPH_NAME
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled(),
            (dummy, dummy, torch.zeros_like(dummy)),
            str(raw),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names}
            | {"embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        optimized = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=1,
        )
        optimized.save_model_to_file(str(fused))
        # Per-channel scales keep the embeddings within cos ~0.99 of fp32; per-tensor int8
        # drifted to ~0.94 on this model. DefaultTensorType covers outputs of fused contrib ops,
        # which shape inference cannot type.
        quantize_dynamic(
            str(fused),
            str(quant),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": 1},
        )
    return quant
