"""LoRA adapter experts in experts.yaml: sharing the base's engine, and every mistake named by
its key (no engine starts here; tests/test_lora_engine.py serves them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from coe.cache.pool import EnginePool, engine_key
from coe.config import ConfigError, load_config
from coe.engines.lora import AdapterExpertEngine, adapter_id
from coe.engines.registry import engine_kind
from coe.models.adapters import prepared_adapter

from .conftest import TEST_EXPERT_DEFAULTS

LORA = {"max_loras": 2, "max_rank": 8}


@pytest.fixture(scope="module")
def adapters() -> list[Path]:
    return [prepared_adapter(seed) / "adapter" for seed in (1, 2, 3)]


def lora_pool(adapters: list[Path], **base_vllm: object) -> dict:
    vllm = {**TEST_EXPERT_DEFAULTS["vllm"], "lora": LORA, **base_vllm}  # type: ignore[dict-item]
    return {
        "experts": [
            {"name": "gemma", **TEST_EXPERT_DEFAULTS, "vllm": vllm},
            *(
                {"name": f"tuned{i}", "base": "gemma", "adapter": str(a)}
                for i, a in enumerate(adapters)
            ),
        ],
        "categories": [{"name": "general", "expert": "gemma"}],
    }


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_adapters_share_the_base_engine_each_with_its_own_adapter(
    tmp_path: Path, adapters: list[Path]
) -> None:
    cfg = load_config(write(tmp_path, lora_pool(adapters)))
    keys = {engine_key(cfg, e) for e in cfg.experts}
    assert len(keys) == 1  # the base and its three adapters: one engine
    (spec,) = keys
    assert spec.options.lora is not None and spec.options.lora.max_loras == 2
    # The pool's own engines: one, and each adapter expert's view of it carries the adapter.
    pool = EnginePool(cfg)
    assert len(pool.engines) == 1
    assert pool.engine_for("gemma") is pool.engines[0]
    views = [pool.engine_for(f"tuned{i}") for i in range(3)]
    assert all(isinstance(v, AdapterExpertEngine) and v.engine is pool.engines[0] for v in views)
    ids = [v.adapter.id for v in views]  # type: ignore[attr-defined]
    assert len(set(ids)) == 3
    # Stable: the id is the folder's, in any process.
    assert ids[0] == adapter_id(adapters[0])
    # Injected engines (a Ray gateway's handles) know no adapters: each LoRA expert has its own,
    # so its deployment serves the request as that expert.
    injected = EnginePool(cfg, lambda config, expert, name: _Fake(name))
    assert [injected.engine_for(n).name for n in ("gemma", "tuned0", "tuned2")] == [
        "gemma",
        "tuned0",
        "tuned2",
    ]
    backend = engine_kind("vllm").backend(cfg.expert("tuned0"))
    assert backend.startswith("gemma + LoRA ")


def test_a_model_as_base_shares_one_engine_among_its_adapters(
    tmp_path: Path, adapters: list[Path]
) -> None:
    entry = {"model": "coe:gemma-3-270m", "max_model_len": 1024, "vllm": {"cpu_kv_cache_gib": 1}}
    data = {
        "experts": [
            {
                "name": f"tuned{i}",
                "base": entry["model"],
                "adapter": str(a),
                "max_model_len": 1024,
                "vllm": entry["vllm"],
            }
            for i, a in enumerate(adapters)
        ],
        "categories": [{"name": "general", "expert": "tuned0"}],
    }
    cfg = load_config(write(tmp_path, data))
    keys = {engine_key(cfg, e) for e in cfg.experts}
    assert len(keys) == 1
    (spec,) = keys
    assert spec.options.lora is not None  # LoRA on, with the defaults
    assert spec.model.endswith("gemma-3-270m")


def test_rank_above_the_engines_max_rank_names_the_key(
    tmp_path: Path, adapters: list[Path]
) -> None:
    big = prepared_adapter(5, rank=32) / "adapter"
    (problem,) = problems_of(write(tmp_path, lora_pool([*adapters[:1], big])))
    assert problem.startswith("experts[2].adapter: rank 32 is above expert 'gemma's ")
    assert "vllm.lora.max_rank (8)" in problem


def test_missing_folder_and_pickled_adapter_are_refused(
    tmp_path: Path, adapters: list[Path]
) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters[0] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    data = lora_pool([tmp_path / "nowhere", pickled])
    missing, pickle = problems_of(write(tmp_path, data))
    assert missing.startswith("experts[1].adapter: ") and "is not a folder" in missing
    assert pickle.startswith("experts[2].adapter: ") and "adapter_model.bin, a pickle" in pickle


def test_adapter_of_another_model_is_refused(tmp_path: Path, adapters: list[Path]) -> None:
    other = tmp_path / "other"
    shutil.copytree(adapters[0], other)
    # An adapter trained on a model with another hidden size: its matrices do not fit.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / "adapter_model.safetensors"))
    tensors = {
        name: t[:, :320].contiguous() if ".lora_A." in name else t for name, t in tensors.items()
    }
    save_file(tensors, str(other / "adapter_model.safetensors"))
    (problem,) = problems_of(write(tmp_path, lora_pool([other])))
    assert problem.startswith("experts[1].adapter: does not fit base 'gemma': ")
    assert "an adapter of another model" in problem


def test_base_rules_name_the_key(tmp_path: Path, adapters: list[Path]) -> None:
    data = lora_pool(adapters[:1])
    data["experts"][0]["vllm"].pop("lora")
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("experts[1].base: expert 'gemma' serves no adapters; add `lora:`")
    data = lora_pool(adapters[:1])
    data["experts"][1].pop("base")
    (problem,) = problems_of(write(tmp_path, data))
    assert problem == "experts[1].base: required with adapter (a LoRA expert names both)"
    data = lora_pool(adapters[:1])
    data["experts"][1]["model"] = "coe:gemma-3-270m"
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("experts[1].model: not allowed on a LoRA expert")
    data = lora_pool(adapters[:1], lora={"max_loras": 4, "max_cpu_loras": 2})
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("experts[0].vllm.lora.max_cpu_loras: 2 is below max_loras (4)")
    data = lora_pool(adapters[:1], lora={"max_rank": 12})
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("experts[0].vllm.lora.max_rank: ")


def test_adapter_config_rank_pattern_counts(tmp_path: Path, adapters: list[Path]) -> None:
    folder = tmp_path / "patterned"
    shutil.copytree(adapters[0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 64}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (problem,) = problems_of(write(tmp_path, lora_pool([folder])))
    assert "rank 64 is above" in problem


class _Fake:
    def __init__(self, name: str):
        self.name = name
        self.ready = False

    async def start(self) -> None:
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False

    def stream(self, *args: object, **kwargs: object) -> object:
        raise NotImplementedError


def test_coe_experts_shows_adapter_experts(tmp_path: Path, adapters: list[Path]) -> None:
    from .conftest import coe

    result = coe("--config", str(write(tmp_path, lora_pool(adapters))), "experts", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["experts"]}
    assert rows["gemma"]["lora"] is None
    assert rows["tuned1"]["lora"] == {"base": "gemma", "adapter": str(adapters[1]), "rank": 8}
    # No pool running: adapters start on disk (loaded on first use), the base in its engine.
    assert rows["tuned1"]["tier"] == "disk" and rows["gemma"]["tier"] == "hbm"
    table = coe("--config", str(write(tmp_path, lora_pool(adapters))), "experts")
    assert "LoRA" in table.stdout and "r8" in table.stdout  # rich wraps the cell


def test_null_adapter_is_a_zero_rank_one_adapter_of_the_base(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from coe.engines.lora import LoraOptions, fit_problems, null_adapter, read_adapter
    from coe.engines.vllm_local import _lora_args
    from coe.models import prepare_model

    base = prepare_model("gemma-3-270m")
    folder = null_adapter(base, tmp_path / "null")
    info = read_adapter(folder)
    assert info.rank == 1 and fit_problems(info, base) == []
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == 2 and all(not t.any() for t in tensors.values())
    assert _lora_args(None) == {}
    args = _lora_args(LoraOptions(max_loras=2, max_rank=8))
    assert args == {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 2}


def test_an_adapter_expert_needs_its_bases_model(tmp_path: Path, adapters: list[Path]) -> None:
    from coe.cli.runtime import needed_models

    cfg = load_config(write(tmp_path, lora_pool(adapters)))
    assert needed_models(cfg, ["tuned0"]) == ["coe:gemma-3-270m"]


def test_adapter_residency_mirrors_vllms_slot_and_host_caches(tmp_path: Path) -> None:
    """Two slots, three adapters in host memory: the least recently used adapter leaves its
    slot for host memory, then host memory for disk; every move is reported once."""
    from coe.engines.lora import AdapterResidency

    residency = AdapterResidency(slots=2, host=3)
    moves: list[tuple[str, str, str]] = []
    residency.listeners.append(lambda *move: moves.append(move))
    for name in "abcd":
        residency.register(name, tmp_path / name)
    residency.used("a")
    residency.used("b")
    assert moves == [("a", "disk", "host"), ("a", "host", "engine"),
                     ("b", "disk", "host"), ("b", "host", "engine")]  # fmt: skip
    moves.clear()
    residency.used("c")  # a leaves its slot (b was used later)
    assert moves == [("c", "disk", "host"), ("c", "host", "engine"), ("a", "engine", "host")]
    assert [residency.tier(n) for n in "abcd"] == ["host", "engine", "engine", "disk"]
    moves.clear()
    residency.loaded("d")  # a prefetch: host memory holds three, so a goes back to disk
    assert moves == [("d", "disk", "host"), ("a", "host", "disk")]
    residency.used("b")  # already in a slot: no move, one more hit
    assert moves == [("d", "disk", "host"), ("a", "host", "disk")]
    rows = {r["expert"]: r for r in residency.status()}
    assert {n: r["tier"] for n, r in rows.items()} == {
        "a": "disk", "b": "engine", "c": "engine", "d": "host"}  # fmt: skip
    assert rows["b"]["hits"] == 2 and rows["d"]["hits"] == 0
    residency.reset()  # the engine restarted: nothing loaded
    assert {residency.tier(n) for n in "abcd"} == {"disk"}


def test_pool_counts_adapter_moves_and_lists_adapters_in_the_cache_status(
    tmp_path: Path, adapters: list[Path]
) -> None:
    """The pool reports its LoRA engine's adapter moves as coe_weight_moves_total{kind=
    "adapter"} and lists the adapters with their tiers (what `coe experts` shows live)."""
    from prometheus_client import REGISTRY

    cfg = load_config(write(tmp_path, lora_pool(adapters)))
    pool = EnginePool(cfg)  # not started: the residency is bookkeeping of its own
    residency = pool.engines[0].adapters  # type: ignore[attr-defined]

    def moved(source: str, target: str) -> float:
        labels = {"kind": "adapter", "from_tier": source, "to_tier": target}
        return REGISTRY.get_sample_value("coe_weight_moves_total", labels) or 0.0

    before = moved("host", "engine"), moved("disk", "host")
    assert {r["tier"] for r in pool.cache_status()} == {"disk"}
    residency.used("tuned1")
    assert (moved("host", "engine"), moved("disk", "host")) == (before[0] + 1, before[1] + 1)
    tiers = {r["expert"]: r["tier"] for r in pool.cache_status()}
    assert tiers == {"tuned0": "disk", "tuned1": "engine", "tuned2": "disk"}
