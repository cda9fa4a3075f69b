"""`coe bench cluster`: the simulated cluster replays its trace through the real routing rule,
scheduler and residency code. Small sizes, pure Python, seconds."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence

import pytest

from coe.bench import cluster
from coe.bench.cluster import ClusterSpec, Moves, TraceSpec, make_trace, simulate
from coe.cluster import policy

from .conftest import coe

SMALL = ClusterSpec(nodes=2, gpus_per_node=4, host_experts=4, batch=8)
TRACE = TraceSpec(requests=400, experts=12, rate=4.0, burst_every_s=40.0, burst_len_s=8.0)


def test_a_seed_gives_the_same_figures_and_another_seed_others() -> None:
    trace = make_trace(TRACE)
    for name in cluster.POLICIES:
        gpus = 12 if name == "static" else None
        first = simulate(name, trace, SMALL, Moves(), gpus)
        again = simulate(name, make_trace(TRACE), SMALL, Moves(), gpus)
        assert (first.ttft_s, first.e2e_s, first.swaps) == (again.ttft_s, again.e2e_s, again.swaps)
        assert len(first.ttft_s) == TRACE.requests
    other = make_trace(TraceSpec(**{**TRACE.__dict__, "seed": 1}))
    assert [r.expert for r in other.requests] != [r.expert for r in trace.requests]
    assert simulate("residency", other, SMALL, Moves()).ttft_s != first.ttft_s


def test_the_static_baseline_never_moves_weights() -> None:
    trace = make_trace(TRACE)
    run = simulate("static", trace, SMALL, Moves(), gpus=16)  # 12 engines, 4 extra
    assert (run.swaps, run.disk_loads, run.cold_starts) == (0, 0, 0)
    with pytest.raises(ValueError, match="one GPU per expert"):
        simulate("static", trace, SMALL, Moves(), gpus=8)


def test_one_popular_expert_stops_swapping_once_its_replicas_are_up() -> None:
    """Every request for one expert: the rule spreads it over GPUs (swaps while the load grows),
    each GPU loads it at most once, and then every request finds it in HBM."""
    spec = TraceSpec(
        requests=800, experts=4, mix=(("coding", 1.0),), zipf=60.0, rate=8.0, burst_x=1.0
    )
    trace = make_trace(spec)
    assert {r.expert for r in trace.requests} == {"coding-0"}
    run = simulate("residency", trace, SMALL, Moves())
    holders_at_start = 2  # 8 GPUs dealt 4 experts
    assert 0 < run.swaps <= SMALL.gpus - holders_at_start
    half = trace.duration_s / 2
    assert sum(1 for t in run.swap_times if t > half) == 0


def test_trace_popularity_follows_the_zipf_exponent() -> None:
    exponent = 1.2
    spec = TraceSpec(requests=40_000, experts=16, mix=(("coding", 1.0),), zipf=exponent)
    counts = Counter(r.expert for r in make_trace(spec).requests)
    ranked = [counts[f"coding-{k}"] for k in range(8)]  # the well-sampled head
    xs = [math.log(k + 1) for k in range(8)]
    ys = [math.log(c) for c in ranked]
    slope = _slope(xs, ys)
    assert slope == pytest.approx(-exponent, abs=0.1)


def test_the_category_mix_splits_the_experts_and_the_requests() -> None:
    groups = cluster.expert_groups(tuple(cluster.ARENA_HARD_LIKE.items()), 64)
    assert sum(len(m) for m in groups.values()) == 64
    assert len(groups["coding"]) > len(groups["writing"]) > len(groups["humanities"]) >= 1
    trace = make_trace(TraceSpec(requests=5000))
    share = Counter(r.category for r in trace.requests)["coding"] / 5000
    assert share == pytest.approx(cluster.ARENA_HARD_LIKE["coding"], abs=0.03)


def test_the_simulation_routes_with_the_policy_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace rank_replicas with a rule that takes the most loaded replica: the figures move.
    Each replica carries its capacity (the batch)."""
    trace = make_trace(TRACE)
    real = simulate("residency", trace, SMALL, Moves())
    calls: list[str] = []

    def most_loaded(
        expert: str, replicas: Sequence[policy.ReplicaLoad], **_: object
    ) -> list[list[str]]:
        calls.append(expert)
        assert all(r.capacity == SMALL.batch for r in replicas)  # each GPU's batch is its capacity
        return [[r.replica for r in sorted(replicas, key=lambda r: (-r.queue, r.replica))]]

    monkeypatch.setattr(policy, "rank_replicas", most_loaded)
    worse = simulate("residency", trace, SMALL, Moves())
    assert len(calls) == TRACE.requests
    assert worse.ttft_p(0.99) > real.ttft_p(0.99)
    assert (worse.ttft_s, worse.swaps) != (real.ttft_s, real.swaps)


def test_a_run_stops_once_its_slo_is_missed_for_sure() -> None:
    trace = make_trace(TRACE)
    full = simulate("multiplex", trace, SMALL, Moves(), gpus=2)
    assert full.ttft_p(0.99) > 1.0
    stopped = simulate("multiplex", trace, SMALL, Moves(), gpus=2, slo_s=1.0)
    assert stopped.decided_fail and not stopped.meets(1.0)
    assert len(stopped.ttft_s) < len(full.ttft_s)


def test_swap_json_feeds_the_move_times(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "swap.json"
    path.write_text(
        json.dumps(
            {
                "device": "cuda",
                "host_to_hbm_s": 0.5,
                "disk_to_host_s": 3.0,
                "engine_cold_start_s": 40.0,
                "checkpoint_bytes": 1000,
            }
        )
    )
    moves = cluster.moves_from_json(path)
    assert (moves.host_to_hbm_s, moves.disk_to_host_s, moves.cold_start_s) == (0.5, 3.0, 40.0)
    assert moves.expert_bytes == 1000
    assert cluster.with_moves(moves, {"disk_to_host_s": 9.0, "cold_start_s": None}) == (
        cluster.Moves(0.5, 9.0, 40.0, 1000, moves.source)
    )


def test_cli_prints_every_policy_side_by_side_as_json() -> None:
    args = ["--nodes", "1", "--gpus-per-node", "8", "--experts", "8", "--requests", "300"]
    result = coe("bench", "cluster", *args, "--rate", "3", "--seed", "2", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"inputs", "trace", "policies", "gpu_saving_vs_static", "targets"}
    assert list(data["policies"]) == ["residency", "multiplex", "static"]
    for figures in data["policies"].values():
        assert set(figures) >= {
            "gpus",
            "goodput_rps",
            "ttft_p50_s",
            "ttft_p99_s",
            "e2e_p50_s",
            "e2e_p99_s",
            "swaps",
            "disk_loads",
            "cold_starts",
            "gpus_for_slo",
        }
    assert data["policies"]["static"]["swaps"] == 0
    assert data["trace"]["requests"] == 300
    table = coe("bench", "cluster", *args, "--rate", "3", timeout=120)
    assert table.returncode == 0, table.stderr
    assert "residency-aware" in table.stdout and "multiplexing" in table.stdout


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return num / sum((x - mx) ** 2 for x in xs)
