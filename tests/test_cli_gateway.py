"""`coe keys new` and `coe bench gateway` as a user runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from coe.gateway.auth import hash_key

from .conftest import RedisProcess, coe


def test_keys_new_prints_the_key_once_and_only_its_hash_for_the_config() -> None:
    run = coe("keys", "new", "--name", "alice", timeout=60)
    assert run.returncode == 0, run.stderr
    key = re.search(r"(coe-\S+)", run.stderr)
    assert key is not None
    (entry,) = yaml.safe_load(run.stdout)
    assert entry == {"name": "alice", "sha256": hash_key(key.group(1))}
    assert key.group(1) not in run.stdout


@pytest.mark.engine
def test_bench_gateway_json_reports_overhead_beside_the_engine(
    test_pool_file: Path, redis_up: RedisProcess
) -> None:
    run = coe(
        "--config", str(test_pool_file), "bench", "gateway", "--json",
        "--requests", "20", "--tokens", "4", "--max-seconds", "60",
        "--redis-url", redis_up.url,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["store"] == "redis" and out["tokens"] == 4 and out["concurrency"] == 16
    # Every phase measured the requests asked for (each phase stops early only past 15 s); and
    # every repeat was a cache hit, or the bench would have failed.
    assert out["requests"] == out["auto_requests"] == out["cache_hits"] == 20, out
    for measure in ("direct", "gateway", "cache_hit", "overhead"):
        assert out[f"{measure}_p99_ms"] >= out[f"{measure}_p50_ms"], measure
    for key in ("direct_p50_ms", "gateway_p50_ms", "cache_hit_p50_ms", "auto_p50_ms"):
        assert out[key] > 0, key
    # A cache hit skips routing and generation: faster than any answer the engine generates.
    assert out["cache_hit_p50_ms"] < out["direct_p50_ms"], out
    assert out["cache_hit_p50_ms"] < out["gateway_p50_ms"], out
    assert out["gateway_requests_s"] > 0 and out["direct_requests_s"] > 0
