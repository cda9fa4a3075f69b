"""Fine-tune the sentence encoder end to end for routing.

A frozen topic embedding with a linear head learns what a prompt is about; the router needs the
kind of answer it asks for, which often sits in a short request after pasted material. Training
the encoder itself with a classification head (mean pooling, L2 normalisation, a linear layer,
cross-entropy) moves the embedding towards that.

The encoder sees exactly what it will see when serving: the same tokens (``embed.token_ids``: the
tokenizer and the head-and-tail cut) and the same pooling as the int8 ONNX graph. Training is
seeded and runs on the CPU (two threads here), so ``coe router fit DATA --finetune`` gives the
same router again. The result is written as an int8 ONNX graph plus its tokenizer, never as
pickled objects.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coe.router.embed import load_tokenizer, resolve_model_dir, token_ids

# What a fine-tuned encoder folder holds besides the graph: enough to tokenize and to describe.
ENCODER_FILES = ("tokenizer.json", "config.json", "modules.json")


class FinetuneSettings(BaseModel):
    """How the encoder is fine-tuned. Saved in router.json, so a fit can be repeated."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=2)
    # The encoder moves slowly; the new head starts from zero and needs a larger step.
    encoder_lr: float = Field(5e-5, gt=0)
    head_lr: float = Field(2e-3, gt=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    # Train the word-embedding table too. Frozen, training is faster; trained, the pieces of
    # scripts the pretrained model barely knows (Cyrillic, Arabic, CJK) can move.
    train_word_embeddings: bool = False
    seed: int = 0
    threads: int | None = Field(None, ge=1)


@dataclass
class FinetunedEncoder:
    coef: np.ndarray  # the trained head: logits = embedding @ coef.T + intercept
    intercept: np.ndarray
    categories: list[str]
    seconds: float
    history: list[dict[str, float]]


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length (little padding), in random order; noise keeps them mixed."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] * (1 + 0.2 * rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune_encoder(
    texts: Sequence[str],
    labels: Sequence[str],
    model: str,
    out: Path,
    *,
    max_seq_length: int,
    tail_tokens: int,
    settings: FinetuneSettings | None = None,
    report: Callable[[str], None] = lambda _m: None,
) -> FinetunedEncoder:
    """Fine-tune MODEL on (texts, labels) and write its int8 ONNX graph into OUT."""
    import torch
    from transformers import AutoModel

    from coe.router.embed import quiet_transformers
    from coe.router.onnx_export import build_onnx_graph, pool_hidden, pooling_of

    settings = settings or FinetuneSettings()
    quiet_transformers()
    base = resolve_model_dir(model)
    mode, normalize = pooling_of(base)
    categories = sorted(set(labels))
    y = torch.tensor([categories.index(c) for c in labels])
    ids = token_ids(load_tokenizer(base), texts, max_seq_length, tail_tokens)

    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    encoder = AutoModel.from_pretrained(str(base))
    encoder.train()
    encoder.get_input_embeddings().weight.requires_grad_(settings.train_word_embeddings)
    head = torch.nn.Linear(int(encoder.config.hidden_size), len(categories))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    trainable = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if not n.endswith("bias") and "LayerNorm" not in n]
    no_decay = [p for n, p in trainable if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "lr": settings.encoder_lr, "weight_decay": settings.weight_decay},
            {"params": no_decay, "lr": settings.encoder_lr, "weight_decay": 0.0},
            {"params": head.parameters(), "lr": settings.head_lr, "weight_decay": 0.0},
        ]
    )
    rng = random.Random(settings.seed)
    steps_per_epoch = math.ceil(len(ids) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(total * settings.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))),
    )

    def embed(batch: list[int]) -> torch.Tensor:
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return pool_hidden(hidden, mask, mode, normalize)

    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    step = 0
    for epoch in range(settings.epochs):
        total_loss, seen, right = 0.0, 0, 0
        for batch in _batches([len(i) for i in ids], settings.batch_size, rng):
            logits = head(embed(batch))
            loss = torch.nn.functional.cross_entropy(logits, y[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for _, p in trainable] + list(head.parameters()), max_norm=1.0
            )
            optimizer.step()
            scheduler.step()
            step += 1
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
            right += int((logits.argmax(1) == y[batch]).sum())
            if step % 50 == 0:
                report(
                    f"  epoch {epoch + 1}/{settings.epochs} step {step}/{total}: "
                    f"loss {total_loss / seen:.3f} ({time.perf_counter() - t0:.0f} s)"
                )
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(total_loss / seen, 4),
                "train_accuracy": round(right / seen, 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        report(f"  epoch {epoch + 1}: loss {total_loss / seen:.3f}, accuracy {right / seen:.3f}")
    seconds = time.perf_counter() - t0

    report("exporting the fine-tuned encoder to int8 ONNX")
    encoder.eval()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".finetuned-", dir=out.parent) as tmp:
        staged = Path(tmp) / "hf"
        encoder.save_pretrained(str(staged), safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "modules.json"):
            if (base / name).exists():
                shutil.copy(base / name, staged / name)
        if (base / "1_Pooling").is_dir():
            shutil.copytree(base / "1_Pooling", staged / "1_Pooling")
        graph = build_onnx_graph(staged, Path(tmp) / "onnx")
        for name in ENCODER_FILES:
            if (staged / name).exists():
                shutil.copy(staged / name, out / name)
        if (staged / "1_Pooling").is_dir():
            shutil.copytree(staged / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
        shutil.move(str(graph), out / graph.name)
    (out / "finetune.json").write_text(
        json.dumps(
            {"base_model": str(model), "settings": settings.model_dump(), "history": history},
            indent=2,
        )
        + "\n"
    )
    return FinetunedEncoder(
        coef=head.weight.detach().numpy().astype(np.float64),
        intercept=head.bias.detach().numpy().astype(np.float64),
        categories=categories,
        seconds=seconds,
        history=history,
    )
