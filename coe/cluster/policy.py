"""Which expert replica should take a request: the residency-aware rule, without Ray.

A replica reports, per expert, the tier its weights are in (HBM: it can run now; host RAM: a
copy away; disk or absent: a load away) and how many requests it holds. The rule prefers the
cheapest move, and among equals the shortest queue:

1. replicas with the expert in HBM,
2. replicas with it in host RAM,
3. every other replica, least loaded first (one of them will load the expert).

A replica runs ``capacity`` requests at once (Serve's ``max_ongoing_requests``; a batch). While
a resident replica has room, sending it the request costs nothing: the request joins a running
batch. Sending it elsewhere costs a swap there, and the expert that replica held loses its home,
so its next requests land on a busy replica that must drain before swapping back. A resident
replica therefore keeps its preference until it is full (``queue >= capacity``), however idle
the others are. A full resident replica loses its preference only while some replica has room:
then the request goes to the least-loaded replica with room, which loads the expert (a second
copy of a hot expert). When every replica is full, moving helps nothing, so residency still
ranks first. A replica of unknown capacity (None) is never full: it never spills.

Among replicas that would have to load the expert, the shortest queue comes first: an idle
replica (queue 0) swaps at once and displaces only experts with no requests; a busy one must
drain first. A replica that is full ranks after every replica with room.

The Serve request router (request_router.py) and the cluster simulation (coe.bench.cluster) both
call ``rank_replicas``; that is what makes the simulation measure the real rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coe.cache.tiers import Tier


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows of one expert replica."""

    replica: str
    # Expert name -> where its weights are on this replica; an expert absent here is on disk.
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    # Requests running or queued on the replica.
    queue: int = 0
    # Requests it runs at once (Serve's max_ongoing_requests; the batch); None: unknown, never full.
    capacity: int | None = None

    def tier(self, expert: str) -> Tier:
        return self.tiers.get(expert, Tier.DISK)

    @property
    def full(self) -> bool:
        return self.capacity is not None and self.queue >= self.capacity


def rank_replicas(expert: str, replicas: Sequence[ReplicaLoad]) -> list[list[str]]:
    """Replica ids in ranks, best first: the expert in HBM, in host RAM, the rest; within a
    rank, replicas with room before full ones, then shortest queue first. A full resident
    replica drops to the rest while any replica has room. Empty ranks are left out; every
    replica appears exactly once."""
    if not replicas:
        return []
    room = any(not r.full for r in replicas)
    hbm: list[ReplicaLoad] = []
    host: list[ReplicaLoad] = []
    rest: list[ReplicaLoad] = []
    for r in replicas:
        spills = r.full and room
        tier = r.tier(expert)
        if tier is Tier.HBM and not spills:
            hbm.append(r)
        elif tier is Tier.HOST and not spills:
            host.append(r)
        else:
            rest.append(r)
    ranks = [
        sorted(group, key=lambda r: (r.full, r.queue, r.replica)) for group in (hbm, host, rest)
    ]
    return [[r.replica for r in group] for group in ranks if group]


@dataclass(frozen=True)
class ReplicaReport:
    """What an expert replica says of itself (its ``record_routing_stats``), as of ``at``."""

    tiers: Mapping[str, Tier]
    queue: int
    # How many checkpoints its weight-cache slots hold at once, and the experts that go through
    # them; experts outside the cache (a plain engine's) are resident for good.
    slots: int
    swappable: frozenset[str]
    at: float

    @classmethod
    def from_stats(cls, stats: Mapping[str, object]) -> ReplicaReport | None:
        """Parse a replica's routing stats; None for stats from anything else (or none yet)."""
        try:
            tiers = {str(k): Tier(str(v)) for k, v in dict(stats["tiers"]).items()}  # type: ignore[call-overload]
            return cls(
                tiers=tiers,
                queue=int(stats["queue"]),  # type: ignore[call-overload]
                slots=int(stats["slots"]),  # type: ignore[call-overload]
                swappable=frozenset(str(e) for e in stats["swappable"]),  # type: ignore[attr-defined]
                at=float(stats["at"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError):
            return None


class ResidencyBook:
    """The router's view of every replica: its last report, plus the requests routed to it since.

    Reports come every few seconds (Serve polls ``record_routing_stats``); requests come much
    faster. Without the requests routed since, a burst for an expert held nowhere would see
    "on disk everywhere" for every request and scatter, each replica swapping it in. So a
    request routed to a replica counts as having made its expert resident there (a weight-cache
    slot then evicts the expert used least recently), until a newer report says what happened.
    """

    def __init__(self) -> None:
        self._reports: dict[str, ReplicaReport] = {}
        self._routed: dict[str, list[tuple[float, str]]] = {}

    def report(self, replica: str, report: ReplicaReport) -> None:
        self._reports[replica] = report
        # What the report already reflects needs no guessing any more.
        self._routed[replica] = [(t, e) for t, e in self._routed.get(replica, []) if t > report.at]

    def routed(self, replica: str, expert: str, now: float) -> None:
        self._routed.setdefault(replica, []).append((now, expert))

    def forget(self, keep: set[str]) -> None:
        """Drop replicas that no longer exist."""
        for book in (self._reports, self._routed):
            for replica in [r for r in book if r not in keep]:
                del book[replica]

    def load(self, replica: str, capacity: int | None = None) -> ReplicaLoad:
        """The replica as the rule sees it; ``capacity`` is its max_ongoing_requests (the router
        knows it; None: unknown, the replica never counts as full)."""
        report = self._reports.get(replica)
        routed = self._routed.get(replica, [])
        if report is None:
            return ReplicaLoad(replica, {}, len(routed), capacity)
        tiers = dict(report.tiers)
        last_used = {e: t for t, e in routed}
        for _, expert in routed:
            if expert not in report.swappable or tiers.get(expert) is Tier.HBM:
                continue
            tiers[expert] = Tier.HBM
            resident = [e for e in report.swappable if tiers.get(e) is Tier.HBM]
            while len(resident) > report.slots:
                # The slot's least recently used checkpoint leaves HBM for host RAM.
                victim = min(
                    (e for e in resident if e != expert),
                    key=lambda e: last_used.get(e, float("-inf")),
                )
                tiers[victim] = Tier.HOST
                resident.remove(victim)
        return ReplicaLoad(replica, tiers, report.queue + len(routed), capacity)
