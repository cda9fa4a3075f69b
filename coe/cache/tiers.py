"""Where an expert's weights are, and what the cache knows about each expert."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Tier(StrEnum):
    HBM = "hbm"  # live in a slot's engine: requests can run now
    HOST = "host"  # a copy in host RAM (a slot worker's host tier): a copy away from HBM
    DISK = "disk"  # only the checkpoint: a read and a conversion away


@dataclass
class ExpertResidency:
    """The cache's record of one expert. Changed only through the methods of
    coe.cache.residency.ResidencyManager, so the books stay in one place (SleepPlanner keeps
    records of its own, for their request rates only)."""

    name: str
    path: str  # checkpoint folder
    disk_bytes: int
    resident_slot: int | None = None  # slot whose engine holds these weights
    host_slot: int | None = None  # slot worker that keeps the host copy
    host_layout: str | None = None  # "engine" (captured) or "checkpoint" (staged)
    host_bytes: int = 0
    loading: bool = False  # DISK -> HOST in progress
    failed: str | None = None  # the last load error, cleared when a new request asks again
    hits: int = 0  # requests served
    swaps_in: int = 0
    last_used: float = 0.0
    _rate: float = 0.0  # requests per second, exponentially decayed
    _rate_at: float = 0.0

    @property
    def tier(self) -> Tier:
        if self.resident_slot is not None:
            return Tier.HBM
        if self.host_slot is not None and not self.loading:
            return Tier.HOST
        return Tier.DISK

    def forget_host(self) -> None:
        """No host copy any more (evicted, replaced, or its worker restarted)."""
        self.host_slot, self.host_layout, self.host_bytes, self.loading = None, None, 0, False

    def note_request(self, now: float, half_life_s: float) -> None:
        self._rate = self.rate(now, half_life_s) + math.log(2) / half_life_s
        self._rate_at = now
        self.last_used = now

    def rate(self, now: float, half_life_s: float) -> float:
        """Decayed request rate: each request adds ln2/half_life, which halves every half-life
        (a steady stream of r requests/s converges to r)."""
        if self._rate == 0.0:
            return 0.0
        return self._rate * 0.5 ** ((now - self._rate_at) / half_life_s)

    def as_dict(self) -> dict[str, object]:
        return {
            "expert": self.name,
            "tier": self.tier.value,
            "slot": self.resident_slot if self.resident_slot is not None else self.host_slot,
            "host_layout": self.host_layout,
            "host_bytes": self.host_bytes,
            "disk_bytes": self.disk_bytes,
            "hits": self.hits,
            "swaps_in": self.swaps_in,
            "loading": self.loading,
            "failed": self.failed,
        }
