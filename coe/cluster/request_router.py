"""Serve's request router for expert deployments: each request goes to a replica that already
holds its expert's weights (HBM, else host RAM) while it has room (under its
``max_ongoing_requests``), else to the least-loaded replica.

Serve builds one of these per deployment handle (in each gateway replica), keeps its replica
list current, and hands it each replica's ``record_routing_stats`` answer. ``choose_replicas``
ranks the replicas with coe.cluster.policy (the rule `coe bench cluster` simulates); Serve then
probes the queue lengths within the best rank and sends the request to the shortest queue.
"""

from __future__ import annotations

import time

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from coe.cluster.policy import ReplicaReport, ResidencyBook, rank_replicas


def expert_of(request: PendingRequest | None) -> str | None:
    """The expert a call is for: ServeEngine passes it as the ``expert`` keyword."""
    if request is None:
        return None
    expert = request.kwargs.get("expert")
    return expert if isinstance(expert, str) else None


class ResidencyRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs: object) -> None:
        self.book = ResidencyBook()

    def _refresh(self, replicas: list[RunningReplica]) -> None:
        for replica in replicas:
            report = ReplicaReport.from_stats(replica.routing_stats or {})
            if report is not None:
                self.book.report(replica.replica_id.unique_id, report)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        expert = expert_of(pending_request)
        if expert is None or not candidate_replicas:
            return [candidate_replicas]
        self._refresh(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [self.book.load(i, capacity=r.max_ongoing_requests) for i, r in by_id.items()]
        return [[by_id[i] for i in rank] for rank in rank_replicas(expert, loads)]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        expert = expert_of(pending_request)
        if expert is not None:
            self.book.routed(replica_id.unique_id, expert, time.time())

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.book.forget({r.replica_id.unique_id for r in replicas})
