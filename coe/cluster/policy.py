"""Which expert replica should take a request: the residency-aware rule, without Ray.

A replica reports, per expert, the tier its weights are in (HBM: it can run now; host RAM: a
copy away; disk or absent: a load away) and how many requests it holds. The rule prefers the
cheapest move, and among equals the shortest queue:

1. replicas with the expert in HBM,
2. replicas with it in host RAM,
3. every other replica, least loaded first (one of them will load the expert).

A hot expert must not pile onto its one resident replica while others idle: a replica whose
queue is ``spill_queue`` or more requests longer than the least-loaded replica's loses its
residency preference, so the load spreads and a second replica loads the expert.

The Serve request router (request_router.py) and the cluster simulation (coe.bench.cluster) both
call ``rank_replicas``; that is what makes the simulation measure the real rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coe.cache.tiers import Tier

# Requests a resident replica may hold beyond the least-loaded one before the rule spreads load.
DEFAULT_SPILL_QUEUE = 8


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows of one expert replica."""

    replica: str
    # Expert name -> where its weights are on this replica; an expert absent here is on disk.
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    # Requests running or queued on the replica.
    queue: int = 0

    def tier(self, expert: str) -> Tier:
        return self.tiers.get(expert, Tier.DISK)


def rank_replicas(
    expert: str,
    replicas: Sequence[ReplicaLoad],
    *,
    spill_queue: int = DEFAULT_SPILL_QUEUE,
) -> list[list[str]]:
    """Replica ids in ranks, best first; within a rank, shortest queue first. Empty ranks are
    left out; every replica appears exactly once."""
    if not replicas:
        return []
    lightest = min(r.queue for r in replicas)
    hbm: list[ReplicaLoad] = []
    host: list[ReplicaLoad] = []
    rest: list[ReplicaLoad] = []
    for r in replicas:
        overloaded = r.queue - lightest >= spill_queue
        tier = r.tier(expert)
        if tier is Tier.HBM and not overloaded:
            hbm.append(r)
        elif tier is Tier.HOST and not overloaded:
            host.append(r)
        else:
            rest.append(r)
    ranks = [sorted(group, key=lambda r: (r.queue, r.replica)) for group in (hbm, host, rest)]
    return [[r.replica for r in group] for group in ranks if group]
