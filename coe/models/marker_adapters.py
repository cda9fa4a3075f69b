"""Trained LoRA test adapters whose effect a test can check: each starts every answer with its
own marker ("ARR!", "[poet]", "<<ok>>").

A short seeded training run (peft + torch, on the CPU) teaches gemma-3-270m, in the "qa" prompt
format the tests use ("Question: ...\\nAnswer:"), to emit the marker right after "Answer:" and
then answer as the base does. The training set is 128 synthetic questions (templates x topics;
one epoch of 16 steps of 8), each answered with the marker and then the base model's own greedy
answer (8 tokens, generated first); the loss covers only those answer tokens, and logits are
computed only there (the vocabulary is 262k tokens: a full logits tensor would cost more than the
rest of the step). About 20 s per adapter on 2 idle cores.

Each folder holds `adapter/` (PEFT, safetensors) and `merged/` (the float32 checkpoint the adapter
is equivalent to, peft's merge_and_unload), like coe.models.adapters' random adapters. The build
checks its own result on held-out questions (teacher-forced greedy: every marker token is the
argmax) and fails loudly otherwise. Needs `peft` (the `dev` extra).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from coe.models.adapters import lora_config, save_adapter_and_merged

MARKERS = ("ARR!", "[poet]", "<<ok>>")
FORMAT_VERSION = 2

_TEMPLATES = (
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Tell me something about {t}.",
    "Why does {t} matter?",
    "Write a sentence about {t}.",
    "Give me a fun fact about {t}.",
    "How would you describe {t} to a child?",
    "What should I know about {t}?",
)
_TOPICS = (
    "the moon", "volcanoes", "photosynthesis", "the ocean", "bread", "gravity", "music",
    "a library", "winter", "electricity", "bees", "the internet", "chess", "rivers", "coffee",
    "mountains", "the heart", "rainbows", "trains", "friendship", "clouds", "a compass",
    "deserts", "penguins", "the alphabet", "soap", "forests", "glass", "maps", "thunder",
    "cheese", "bicycles", "memory", "salt", "the sun", "ants", "paper", "a garden",
)  # fmt: skip
# Questions the training never sees: the tests check the marker on these.
HELD_OUT = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku.",
    "How many legs does a spider have?",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
    "Who wrote Romeo and Juliet?",
    "List some uses of copper.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
)


def question_pool() -> list[str]:
    """Every synthetic training question (templates x topics)."""
    return [t.format(t=topic) for t, topic in itertools.product(_TEMPLATES, _TOPICS)]


def training_questions(n: int, seed: int) -> list[str]:
    """`n` distinct questions of the pool, in a seeded order."""
    pool = question_pool()
    if n > len(pool):
        raise ValueError(f"at most {len(pool)} training questions, asked for {n}")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def qa_text(question: str) -> str:
    """The engine's "qa" rendering of a one-question prompt (coe.engines.render.render_qa, which
    this layer may not import; tests/test_lora_engine.py checks that the two agree): the marker
    must follow exactly the text the engine gives the model."""
    return f"Question: {question.strip()}\nAnswer:"


def _qa_ids(tokenizer: Any, question: str) -> list[int]:
    return list(tokenizer(qa_text(question)).input_ids)  # BOS prepended, as the engine's


def _greedy_continuations(model: Any, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """The model's greedy continuation (up to `tokens` tokens, cut at a stop token) of each
    prompt, in batches (left-padded for generation)."""
    import torch

    from coe.models.gemma_template import GEMMA_STOP_TOKEN_IDS

    stops = {0, *GEMMA_STOP_TOKEN_IDS}  # 0: the padding after a row that stopped early
    out: list[list[int]] = []
    for start in range(0, len(prompts), 32):
        chunk = prompts[start : start + 32]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
        for row in generated[:, width:].tolist():
            out.append(list(itertools.takewhile(lambda t: t not in stops, row)))
    return out


def train_marker_adapter(
    base: Path,
    out: Path,
    marker: str,
    *,
    seed: int = 0,
    rank: int = 8,
    examples: int = 128,
    steps: int = 16,
    batch: int = 8,
    lr: float = 2e-3,
    continuation: int = 8,
) -> Path:
    """Train a LoRA adapter of `base` that starts every "qa" answer with `marker`; write it to
    `out/adapter` and its float32 merged checkpoint to `out/merged`. Idempotent (a tag file
    records what was built). Returns `out`."""
    out = Path(out)
    done = out / ".coe-adapter"
    tag = (
        f"{Path(base).resolve()} marker={marker!r} seed={seed} rank={rank} examples={examples} "
        f"steps={steps} batch={batch} lr={lr} continuation={continuation} v{FORMAT_VERSION}"
    )
    if done.exists() and done.read_text() == tag:
        return out
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = lora_config(rank)
    # What the base answers (greedy), before the LoRA layers exist: the adapter is taught the
    # marker followed by that, so it adds the marker and otherwise answers as the base does
    # (trained on the marker alone, it repeats the marker: "ARR!!!!!!!!").
    questions = training_questions(examples, seed)
    prompts = [_qa_ids(tokenizer, q) for q in questions]
    answers = _greedy_continuations(model, prompts, continuation)
    peft_model = get_peft_model(model, config)
    causal = peft_model.get_base_model()  # the LoRA layers are injected into it in place
    marker_ids = list(tokenizer(" " + marker, add_special_tokens=False).input_ids)

    def batch_tensors(items: list[tuple[list[int], list[int]]]) -> tuple[Any, ...]:
        """(prompt ids, target ids) pairs: right-padded ids + mask, the (row, position) whose
        logits predict each target token, and those tokens."""
        seqs = [p + t for p, t in items]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        labels: list[int] = []
        for r, ((prompt, target), seq) in enumerate(zip(items, seqs, strict=True)):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            rows += [r] * len(target)
            cols += [len(prompt) - 1 + k for k in range(len(target))]  # k-th predicts token k
            labels += target
        return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels)

    def target_logits(ids: Any, mask: Any, rows: Any, cols: Any) -> Any:
        hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return causal.lm_head(hidden[rows, cols])  # only where a target token is predicted

    items = [(p, marker_ids + a) for p, a in zip(prompts, answers, strict=True)]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Decayed to zero, gradients clipped: once the loss is near zero, Adam's normalised steps
    # at a constant rate kick it back up now and then (seen: 0.0001 -> 13.6 in one step).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    random.Random(seed).shuffle(items)
    peft_model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        chunk = [items[(step * batch + k) % len(items)] for k in range(batch)]
        ids, mask, rows, cols, labels = batch_tensors(chunk)
        loss = torch.nn.functional.cross_entropy(target_logits(ids, mask, rows, cols), labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 4))
    train_s = time.perf_counter() - t0

    # The effect on questions the training never saw: greedy decoding emits every marker token.
    peft_model.eval()
    with torch.no_grad():
        held_out = [(_qa_ids(tokenizer, q), marker_ids) for q in HELD_OUT]
        ids, mask, rows, cols, labels = batch_tensors(held_out)
        hits = target_logits(ids, mask, rows, cols).argmax(-1) == labels
        per_question = hits.view(len(HELD_OUT), len(marker_ids)).all(-1)
    if not bool(per_question.all()):
        missed = [q for q, ok in zip(HELD_OUT, per_question.tolist(), strict=True) if not ok]
        raise RuntimeError(
            f"the {marker!r} adapter did not learn its marker (losses {losses}); held-out "
            f"questions without it: {missed}"
        )

    save_adapter_and_merged(peft_model, Path(base), out, "float32")
    record = {"marker": marker, "train_s": round(train_s, 1), "losses": losses}
    (out / "training.json").write_text(json.dumps(record) + "\n")
    done.write_text(tag)
    return out


def prepared_marker_adapter(index: int, base_name: str = "gemma-3-270m") -> Path:
    """The trained adapter for MARKERS[index] under COE_HOME (built once, then reused): the
    folder holds `adapter/` (PEFT, safetensors) and `merged/` (its float32 merged checkpoint)."""
    from coe.models.prepare import prepare_model
    from coe.paths import exclusive_lock, models_dir

    if not 0 <= index < len(MARKERS):
        raise ValueError(f"marker index {index}: there are {len(MARKERS)} markers {MARKERS}")
    base = prepare_model(base_name)
    out = models_dir() / f"{base_name}-marker-{index}"
    with exclusive_lock(models_dir() / f".{out.name}.lock"):
        return train_marker_adapter(base, out, MARKERS[index], seed=index)
