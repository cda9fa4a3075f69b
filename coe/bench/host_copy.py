"""`coe bench host-copy`: the weight cache's HOST → HBM path on this machine's device, no vLLM.

`coe bench swap` needs a vLLM engine, and vLLM's CUDA build is not always at hand: CI has no
GPU, and a GPU machine may have torch but no vLLM. This benchmark drives the same worker code
(`coe.cache.worker.SlotWorker`, as `coe.bench.worker.BenchWorker`: stage a checkpoint from disk
into pinned host memory, capture the resident weights, activate a host copy) against a plain
torch model with a decoder's parameter shapes, on CUDA where present, and prints each figure
beside a reference measured in the same run:

- HOST → HBM (engine layout): `coe_activate` copying every parameter, median of N swaps,
  beside the floor: one pinned host → device copy of the same bytes (`coe_memcpy_floor`);
- DISK → HOST: `coe_stage` reading the safetensors into pinned memory, page cache dropped;
- DISK → HBM: safetensors loading the checkpoint straight onto the device, the least a reload
  from disk (or an engine restart) pays for the weights alone;
- HBM → HOST: `coe_capture`, paid once per expert.

Only the engine's loader is replaced (`reload_weights` copies tensors by name): vLLM's own
loader runs in `coe bench swap`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from coe.bench.worker import BenchWorker
from coe.cache.checkpoint import checkpoint_files, drop_page_cache


@dataclass(frozen=True)
class DecoderShape:
    """The parameter shapes of a decoder-only transformer (attention, gated MLP, norms)."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        yield "embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"layers.{i}."
            yield p + "q_proj.weight", (q, h)
            yield p + "k_proj.weight", (kv, h)
            yield p + "v_proj.weight", (kv, h)
            yield p + "o_proj.weight", (h, q)
            yield p + "gate_proj.weight", (self.intermediate, h)
            yield p + "up_proj.weight", (self.intermediate, h)
            yield p + "down_proj.weight", (h, self.intermediate)
            yield p + "input_norm.weight", (h,)
            yield p + "post_norm.weight", (h,)
        yield "norm.weight", (h,)
        if not self.tied_embeddings:
            yield "lm_head.weight", (self.vocab, h)


SHAPES = {
    # gemma-3-270m, the model the default pool and `coe bench swap` use.
    "270m": DecoderShape(640, 18, 262_144, 2048, 4, 1, 256, tied_embeddings=True),
    # Llama-3-8B, a typical expert of a GPU pool.
    "8b": DecoderShape(4096, 32, 128_256, 14_336, 32, 8, 128, tied_embeddings=False),
    # For tests: small enough to run anywhere in a second.
    "tiny": DecoderShape(64, 2, 1000, 128, 4, 2, 16, tied_embeddings=True),
}


class _Model(torch.nn.Module):
    """Parameters only: the worker moves weights and never runs the model."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            module: torch.nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))


class _Runner:
    def __init__(self, model: torch.nn.Module):
        self._model = model

    def get_model(self) -> torch.nn.Module:
        return self._model


class _ModelConfig:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class BareWorker(BenchWorker):
    """The bench's SlotWorker around a plain torch model: what vLLM's Worker provides, no more."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model_runner = _Runner(model)
        self.model_config = _ModelConfig(dtype)

    def reload_weights(self, weights_iterator: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self._coe_model().named_parameters())
        for name, tensor in weights_iterator:
            params[name].data.copy_(tensor, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def coe_repack(self) -> int:
        return 0  # only vLLM's CPU build packs weights


@dataclass
class HostCopyBench:
    device: str
    device_name: str
    shape: str
    tensors: int
    checkpoint_bytes: int
    disk_to_host_s: float
    page_cache: str
    disk_to_device_s: float
    capture_s: float
    host_to_device_s: float  # engine layout, median
    host_to_device_samples_s: list[float]
    floor_kind: str
    floor_s: float
    effective_gb_s: float
    floor_gb_s: float
    swap_vs_floor: float
    disk_to_device_vs_swap: float
    weights_match: bool  # after the swaps, the device holds exactly the expert's tensors

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sig(seconds: float) -> float:
    """Four significant figures: a tiny checkpoint's copy takes microseconds."""
    return float(f"{seconds:.4g}")


def _device() -> tuple[str, str]:
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name()
    return "cpu", "cpu"


def write_checkpoint(folder: Path, shape: DecoderShape, seed: int, device: str) -> int:
    """A random bf16 checkpoint with `shape`'s tensors (drawn on `device`: fast on a GPU)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {
        name: torch.randn(dims, generator=generator, device=device, dtype=torch.bfloat16).cpu()
        for name, dims in shape.tensors()
    }
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    # On disk before the page cache is dropped: dirty pages cannot be dropped, and the disk
    # figures would be reads from RAM.
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _load_to_device(folder: Path, device: str) -> tuple[dict[str, torch.Tensor], float]:
    from safetensors.torch import load_file

    for file in checkpoint_files(str(folder)):
        drop_page_cache(str(file))
    t0 = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(str(folder)):
        tensors.update(load_file(str(file), device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    return tensors, time.perf_counter() - t0


def _matches(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.detach().cpu(), expected[n]) for n, p in model.named_parameters())


def run_host_copy_bench(
    shape_name: str = "270m", repeats: int = 7, workdir: Path | None = None
) -> HostCopyBench:
    shape = SHAPES[shape_name]
    device, device_name = _device()
    with tempfile.TemporaryDirectory(dir=workdir, prefix="coe-host-copy-") as tmp:
        first, second = Path(tmp) / "a", Path(tmp) / "b"
        nbytes = write_checkpoint(first, shape, seed=1, device=device)
        write_checkpoint(second, shape, seed=2, device=device)

        resident, disk_to_device = _load_to_device(first, device)
        model = _Model(resident)
        worker = BareWorker(model, torch.bfloat16)
        t0 = time.perf_counter()
        worker.coe_capture("a")
        capture = time.perf_counter() - t0

        dropped = all(drop_page_cache(str(f)) for f in checkpoint_files(str(second)))
        worker.coe_stage("b", str(second), drop_cache=True)
        staged = worker.coe_wait_staged("b", timeout=None)
        if staged["state"] != "staged":
            raise RuntimeError(f"reading {second} failed: {staged}")
        worker.coe_activate("b")  # checkpoint layout, through the stand-in loader
        worker.coe_capture("b")

        samples: list[float] = []
        last: Mapping[str, Any] = {}
        for _ in range(repeats):
            for expert in ("a", "b"):
                last = worker.coe_activate(expert)
                if expert == "b":
                    samples.append(last["seconds"])
        from safetensors.torch import load_file

        weights_match = _matches(model, load_file(str(second / "model.safetensors")))
        floor = worker.coe_memcpy_floor(last["copied_bytes"])
        del model, worker, resident
    swap = statistics.median(samples)
    return HostCopyBench(
        device=device,
        device_name=device_name,
        shape=shape_name,
        tensors=sum(1 for _ in shape.tensors()),
        checkpoint_bytes=nbytes,
        disk_to_host_s=_sig(staged["seconds"]),
        page_cache="dropped (posix_fadvise)" if dropped else "warm (could not drop)",
        disk_to_device_s=_sig(disk_to_device),
        capture_s=_sig(capture),
        host_to_device_s=_sig(swap),
        host_to_device_samples_s=[_sig(s) for s in samples],
        floor_kind=floor["kind"],
        floor_s=_sig(floor["seconds"]),
        effective_gb_s=round(nbytes / swap / 1e9, 2),
        floor_gb_s=round(floor["bytes"] / floor["seconds"] / 1e9, 2),
        swap_vs_floor=round(swap / floor["seconds"], 3),
        disk_to_device_vs_swap=round(disk_to_device / swap, 1),
        weights_match=weights_match,
    )
