"""experts.yaml validation: every mistake names the file, the key path and the fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from coe.config import PROJECT_CONFIG, ConfigError, load_config

from .conftest import COE, pool_dict


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "experts.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    return info.value.problems


def test_default_pool_is_valid_and_has_the_nine_categories() -> None:
    cfg = load_config(PROJECT_CONFIG)
    assert set(cfg.category_names) == {
        "writing", "roleplay", "reasoning", "math", "coding",
        "extraction", "stem", "humanities", "general",
    }  # fmt: skip
    assert cfg.router.fallback == "general"
    # Every expert of the embedded pool is a configuration of the one real offline model.
    assert {e.model for e in cfg.experts} == {"coe:gemma-3-270m"}


def test_example_gpu_pool_is_valid() -> None:
    cfg = load_config(PROJECT_CONFIG.parent / "examples" / "experts.gpu.yaml")
    assert len(cfg.experts) >= 4
    assert len({e.model for e in cfg.experts}) == len(cfg.experts)


def test_undefined_expert_is_named(tmp_path: Path) -> None:
    data = pool_dict()
    data["categories"].append({"name": "coding", "expert": "coder"})
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("categories[2].expert: 'coder' is not a defined expert")


def test_unknown_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    data = pool_dict()
    data["experts"][1]["sampling"] = {"max_token": 5}
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("experts[1].sampling.max_token: unknown key")
    assert "max_tokens" in problem


def test_wrong_type_and_range(tmp_path: Path) -> None:
    data = pool_dict()
    data["experts"][0]["max_model_len"] = "long"
    data["experts"][1]["sampling"] = {"temperature": 7}
    found = problems_of(write(tmp_path, data))
    assert any(p.startswith("experts[0].max_model_len:") for p in found)
    assert any(p.startswith("experts[1].sampling.temperature:") for p in found)


def test_duplicates_remote_and_fallback(tmp_path: Path) -> None:
    data = pool_dict()
    data["experts"].append({"name": "qa", "model": "x"})
    data["experts"].append({"name": "far", "engine": "remote"})
    data["router"] = {"fallback": "nowhere"}
    found = problems_of(write(tmp_path, data))
    assert any(p.startswith("experts[2].name: 'qa' is defined twice") for p in found)
    assert any(p.startswith("experts[3].remote: required when engine is 'remote'") for p in found)
    assert any(p.startswith("router.fallback: 'nowhere' is not a defined category") for p in found)


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "experts:\n  - name: a\n   bad: [\n"))
    assert "line " in problem and "not valid YAML" in problem


def test_missing_file(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert "cannot read the file" in problem


def test_relative_model_path_resolves_beside_the_file(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    data = pool_dict(model="weights")
    cfg = load_config(write(tmp_path, data))
    assert cfg.resolve_model(cfg.experts[0]) == str(tmp_path / "weights")


def test_cli_exits_2_naming_the_bad_key(tmp_path: Path) -> None:
    data = pool_dict()
    data["categories"][1]["expert"] = "coder"
    path = write(tmp_path, data)
    run = subprocess.run([COE, "--config", str(path), "experts"], capture_output=True, text=True)
    assert run.returncode == 2
    assert f"{path}: categories[1].expert: 'coder' is not a defined expert" in run.stderr


def test_cli_reads_coe_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, pool_dict())
    run = subprocess.run(
        [COE, "experts", "--json"],
        capture_output=True,
        text=True,
        env={"COE_CONFIG": str(path), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert '"name": "chatty"' in run.stdout


def test_api_keys_are_hashes_with_unique_names(tmp_path: Path) -> None:
    digest = "a" * 64
    data = pool_dict()
    data["gateway"] = {
        "api_keys": [
            {"name": "alice", "sha256": digest},
            {"name": "alice", "sha256": digest},
            {"name": "bob", "sha256": "coe-plaintext-key"},
        ]
    }
    found = problems_of(write(tmp_path, data))
    assert any(p.startswith("gateway.api_keys[2].sha256: String should match") for p in found)
    data["gateway"]["api_keys"].pop()
    found = problems_of(write(tmp_path, data))
    assert "gateway.api_keys[1].name: 'alice' is used twice" in found
    assert any(p.startswith("gateway.api_keys[1].sha256: the same key as 'alice'") for p in found)


def test_strategy_settings_are_checked(tmp_path: Path) -> None:
    data = pool_dict()
    data["experts"][0]["name"] = "auto"
    data["categories"][0]["expert"] = "auto"
    data["categories"][1]["strategy"] = "mixture_of_prompts"
    data["strategies"] = {"expert_prompting": {"writer": "ghost"}}
    found = problems_of(write(tmp_path, data))
    assert any(p.startswith("experts[0].name: 'auto' is reserved") for p in found)
    assert any(
        p.startswith("categories[1].prompts: required when strategy is mixture_of_prompts")
        for p in found
    )
    assert any(
        p.startswith("strategies.expert_prompting.writer: 'ghost' is not a defined expert")
        for p in found
    )
