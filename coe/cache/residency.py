"""The residency policy: the host-tier budget and which expert to evict.

An expert's value in a tier is the time the cache expects to lose if it is evicted: its request
rate (decayed, so recency and frequency both count) times the seconds it takes to bring it back
from the tier it would fall to. Eviction takes the lowest-value experts first. Prefetch may only
evict experts worth less than the one it brings in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coe.cache import metrics
from coe.cache.tiers import ExpertResidency, Tier


@dataclass
class Bandwidths:
    """Bytes per second of each move; start from rough guesses, then follow measurements."""

    disk_to_host: float = 1.0e9
    host_to_hbm: float = 5.0e9  # engine layout: a copy per parameter
    convert: float = 0.3e9  # checkpoint layout through vLLM's reload_weights

    def observe(self, name: str, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        old = getattr(self, name)
        setattr(self, name, 0.7 * old + 0.3 * (nbytes / seconds))


class ResidencyManager:
    def __init__(
        self,
        experts: Iterable[ExpertResidency],
        host_budget: int,
        half_life_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.records = {e.name: e for e in experts}
        # The slot group that holds each checkpoint (it performs evictions of its own units).
        self.owners: dict[str, Any] = {}
        self.host_budget = host_budget
        self.half_life_s = half_life_s
        self.clock = clock
        self.bandwidth = Bandwidths()
        # Engine-layout bytes per checkpoint byte, learned from the first capture.
        self.engine_layout_factor: float | None = None
        # Called with force=True on every move and force=False after requests (a status view).
        self.listeners: list[Callable[[bool], None]] = []

    def __getitem__(self, name: str) -> ExpertResidency:
        return self.records[name]

    # --- the records: every change to an ExpertResidency is made here ---------------------------
    def note_request(self, name: str) -> None:
        record = self.records[name]
        record.note_request(self.clock(), self.half_life_s)
        record.failed = None

    def note_hit(self, name: str) -> None:
        """A request for the expert was served."""
        self.records[name].hits += 1
        self.notify()

    def slot_restarted(self, names: Iterable[str], slot: int) -> None:
        """Slot `slot` of the group holding `names` got a fresh engine: whatever the old one's
        worker held (live weights, host copies) is gone."""
        for name in names:
            record = self.records[name]
            if record.resident_slot == slot:
                record.resident_slot = None
            if record.host_slot == slot:
                record.forget_host()

    def mark_resident(self, name: str, slot: int, *, swapped_in: bool) -> None:
        """The expert's weights are live in `slot` (swapped in, or the slot booted with them)."""
        record = self.records[name]
        record.resident_slot = slot
        if swapped_in:
            record.swaps_in += 1

    def mark_not_resident(self, name: str) -> None:
        self.records[name].resident_slot = None

    def claim_host(self, name: str, slot: int, layout: str, nbytes: int) -> None:
        """Room in the host tier is taken for a copy in `slot`'s worker (a checkpoint-layout
        copy is loading until `staged`)."""
        record = self.records[name]
        record.host_slot, record.host_layout, record.host_bytes = slot, layout, nbytes
        record.loading = layout == "checkpoint"

    def staged(self, name: str, nbytes: int) -> None:
        """A DISK → HOST read finished: the copy takes `nbytes`."""
        record = self.records[name]
        record.loading = False
        record.host_bytes = nbytes

    def captured(self, name: str, nbytes: int) -> None:
        """An engine-layout copy was taken: it takes `nbytes`."""
        self.records[name].host_bytes = nbytes

    def stop_loading(self, name: str) -> None:
        self.records[name].loading = False

    def forget_host(self, name: str) -> None:
        """No host copy any more (evicted, replaced, failed, or its worker restarted)."""
        self.records[name].forget_host()

    def load_failed(self, name: str, error: str) -> None:
        """Loading the checkpoint failed; requests fail with `error` until a new request asks
        again (`note_request`)."""
        self.records[name].failed = error

    def learn_engine_layout(self, name: str, engine_bytes: int) -> None:
        """Engine-layout bytes per checkpoint byte, from the expert a slot booted with."""
        if self.engine_layout_factor is None:
            self.engine_layout_factor = engine_bytes / max(1, self.records[name].disk_bytes)

    # --- costs ---------------------------------------------------------------------------------
    def reload_seconds(self, name: str) -> float:
        """Seconds to bring an expert back from disk into a slot."""
        r = self.records[name]
        return r.disk_bytes / self.bandwidth.disk_to_host + r.disk_bytes / self.bandwidth.convert

    def switch_seconds(self, name: str) -> float:
        """Estimated seconds to make an expert resident from where it is now."""
        r = self.records[name]
        if r.tier is Tier.HBM:
            return 0.0
        if r.tier is Tier.HOST and r.host_layout == "engine":
            return r.host_bytes / self.bandwidth.host_to_hbm
        if r.tier is Tier.HOST:
            return r.disk_bytes / self.bandwidth.convert
        return self.reload_seconds(name)

    def expected_cost(self, name: str) -> float:
        """Seconds the cache expects to lose per second if this expert's host copy goes."""
        return self.records[name].rate(self.clock(), self.half_life_s) * self.reload_seconds(name)

    # --- host budget ----------------------------------------------------------------------------
    def host_used(self) -> int:
        return sum(r.host_bytes for r in self.records.values() if r.host_slot is not None)

    def host_estimate(self, name: str, layout: str) -> int:
        disk = self.records[name].disk_bytes
        if layout == "engine":
            return int(disk * (self.engine_layout_factor or 1.0))
        return disk

    def host_victims(
        self, need: int, *, protect: Iterable[str] = (), below: float | None = None
    ) -> list[str] | None:
        """Experts to evict from the host tier so `need` more bytes fit; None if impossible.

        Resident experts keep their host copy (their eviction from HBM is then free), loading
        ones are left alone, and with `below` only experts worth less than that are taken.
        """
        free = self.host_budget - self.host_used()
        if need <= free:
            return []
        if need > self.host_budget:
            return None
        keep = set(protect)
        candidates = [
            r
            for r in self.records.values()
            if r.host_slot is not None
            and not r.loading
            and r.resident_slot is None
            and r.name not in keep
        ]
        candidates.sort(key=lambda r: (self.expected_cost(r.name), r.last_used))
        victims: list[str] = []
        for r in candidates:
            if below is not None and self.expected_cost(r.name) >= below:
                break
            victims.append(r.name)
            free += r.host_bytes
            if need <= free:
                return victims
        return None

    # --- bookkeeping -----------------------------------------------------------------------------
    def record_move(self, name: str, source: Tier, target: Tier, seconds: float) -> None:
        metrics.SWAPS.labels("checkpoint", source.value, target.value).inc()
        metrics.SWAP_SECONDS.labels(source.value, target.value).observe(seconds)
        self.publish()

    def publish(self) -> None:
        """Refresh the residency gauges from the records."""
        for r in self.records.values():
            for tier in Tier:
                metrics.RESIDENCY.labels(r.name, tier.value).set(1 if r.tier is tier else 0)
        metrics.HOST_BYTES.set(self.host_used())
        self.notify(force=True)

    def notify(self, force: bool = False) -> None:
        for listener in self.listeners:
            listener(force)

    def snapshot(self) -> list[dict[str, object]]:
        return [r.as_dict() for r in self.records.values()]
