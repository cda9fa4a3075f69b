"""The residency-aware routing rule (coe.cluster.policy), without Ray: ranks, capacity-based
spill, and the router's book of reports plus requests routed since."""

from __future__ import annotations

from coe.cache.tiers import Tier
from coe.cluster.policy import ReplicaLoad, ReplicaReport, ResidencyBook, rank_replicas

HBM, HOST = Tier.HBM, Tier.HOST


def load(
    name: str, queue: int, tiers: dict[str, Tier] | None = None, capacity: int | None = 32
) -> ReplicaLoad:
    return ReplicaLoad(name, tiers or {}, queue, capacity)


def test_a_resident_replica_below_capacity_keeps_the_request_even_when_others_idle() -> None:
    replicas = [load("a", 31, {"e": HBM}), load("b", 0), load("c", 0, {"e": HOST})]
    assert rank_replicas("e", replicas) == [["a"], ["c"], ["b"]]


def test_a_full_resident_replica_spills_to_the_least_loaded() -> None:
    replicas = [load("a", 32, {"e": HBM}), load("b", 5), load("c", 2), load("d", 40)]
    assert rank_replicas("e", replicas) == [["c", "b", "a", "d"]]


def test_a_full_resident_replica_spills_to_another_resident_with_room() -> None:
    replicas = [load("a", 32, {"e": HBM}), load("b", 20, {"e": HBM}), load("c", 0)]
    assert rank_replicas("e", replicas) == [["b"], ["c", "a"]]


def test_when_every_replica_is_full_residency_still_ranks_first() -> None:
    replicas = [load("a", 40, {"e": HBM}), load("b", 32)]
    assert rank_replicas("e", replicas) == [["a"], ["b"]]


def test_unknown_capacity_never_spills() -> None:
    replicas = [load("a", 500, {"e": HBM}, capacity=None), load("b", 0, capacity=None)]
    assert rank_replicas("e", replicas) == [["a"], ["b"]]


def test_host_beats_disk_and_the_rest_go_idle_first() -> None:
    replicas = [load("d1", 3), load("h", 4, {"e": HOST}), load("d0", 0), load("x", 1, {"f": HBM})]
    assert rank_replicas("e", replicas) == [["h"], ["d0", "x", "d1"]]


def test_every_replica_appears_once() -> None:
    replicas = [
        load(f"r{i}", q, t, c)
        for i, (q, t, c) in enumerate(
            [(0, {"e": HBM}, 4), (4, {"e": HBM}, 4), (9, {"e": HOST}, 8), (1, {}, None), (7, {}, 2)]
        )
    ]
    ranks = rank_replicas("e", replicas)
    flat = [r for rank in ranks for r in rank]
    assert sorted(flat) == sorted(r.replica for r in replicas) and all(ranks)
    assert rank_replicas("e", []) == []


def report(tiers: dict[str, Tier], at: float, queue: int = 0, slots: int = 1) -> ReplicaReport:
    return ReplicaReport(tiers, queue, slots, frozenset({"a", "b", "c"}), at)


def test_a_routed_request_makes_its_expert_resident_and_evicts_the_least_recently_used() -> None:
    book = ResidencyBook()
    book.report("r", report({"a": HBM, "b": HBM, "c": HOST}, at=1.0, queue=2, slots=2))
    book.routed("r", "a", 2.0)  # a used after b
    book.routed("r", "c", 3.0)  # c comes in: b, used least recently, leaves HBM
    seen = book.load("r", capacity=8)
    assert (seen.tier("a"), seen.tier("b"), seen.tier("c")) == (HBM, HOST, HBM)
    assert (seen.queue, seen.capacity) == (4, 8)
    assert book.load("unknown", capacity=8) == ReplicaLoad("unknown", {}, 0, 8)


def test_a_newer_report_supersedes_the_overlay() -> None:
    book = ResidencyBook()
    book.report("r", report({"a": HBM}, at=1.0))
    book.routed("r", "b", 2.0)
    assert book.load("r").tier("b") is HBM
    book.report("r", report({"a": HBM, "b": HOST}, at=2.5, queue=1))
    seen = book.load("r")
    assert (seen.tier("a"), seen.tier("b"), seen.queue) == (HBM, HOST, 1)
