"""Prometheus metrics of the weight cache. The gateway's /metrics endpoint exports them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# kind: "checkpoint" (a full expert's weights) or "adapter" (a LoRA adapter: tiers engine,
# host, disk).
SWAPS = Counter(
    "coe_weight_moves", "Expert weight moves between tiers.", ["kind", "from_tier", "to_tier"]
)
SWAP_SECONDS = Histogram(
    "coe_weight_move_seconds",
    "Seconds per expert weight move between tiers.",
    ["from_tier", "to_tier"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RESIDENCY = Gauge("coe_expert_residency", "1 where the expert's weights are.", ["expert", "tier"])
QUEUE_DEPTH = Gauge("coe_expert_queue_depth", "Requests waiting for an expert.", ["expert"])
HOST_BYTES = Gauge("coe_host_tier_bytes", "Bytes of expert weights in the host tier.")
