"""A slot group: the experts that share one architecture, served by fewer engines than experts.

The unit of residency is a *checkpoint* (several experts of experts.yaml may be configurations of
one checkpoint; they share its weights and its queue). The group implements the scheduler's
``Switcher``: it moves a checkpoint's weights into a slot along the fastest path it has.

- HOST (engine layout) → HBM: a copy per parameter (``coe_activate``).
- HOST (checkpoint layout) → HBM: vLLM ``reload_weights`` from the staged tensors, then the
  engine layout is captured for next time.
- DISK → HBM: staged into the host tier first when the budget allows (so a missing or corrupt
  checkpoint fails before the engine is touched), else read straight into the engine.

The host copies themselves are `HostTier`'s; the records of where each checkpoint is are the
ResidencyManager's, changed only through its methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from coe.cache.host_tier import HostTier
from coe.cache.residency import ResidencyManager
from coe.cache.scheduler import Scheduler
from coe.cache.signature import SignatureError, architecture_signature
from coe.cache.slot import Slot
from coe.cache.tiers import ExpertResidency, Tier
from coe.engines.base import UP, EngineError, EngineHealth, engine_health
from coe.types import Chunk, Prompt, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One checkpoint in a group and the experts of experts.yaml that use it."""

    name: str
    path: str
    experts: tuple[str, ...]


class SlotGroup:
    def __init__(
        self,
        key: str,
        units: list[Unit],
        slots: list[Slot],
        residency: ResidencyManager,
        *,
        max_wait_s: float = 2.0,
        queue_s: dict[str, float] | None = None,
    ):
        self.key = key
        self.units = {u.name: u for u in units}
        self.unit_of = {e: u.name for u in units for e in u.experts}
        self.slots = slots
        self.residency = residency
        self.scheduler = Scheduler(slots, self, max_wait_s=max_wait_s)
        # Per expert: how long a request may wait in the queue for a slot (None: no limit).
        self.queue_s = queue_s or {}
        paths = {u.name: u.path for u in units}
        self.host = HostTier(slots, paths, residency, self._busy_units)
        self._start_lock = asyncio.Lock()
        # One boot of a slot at a time: the supervisor and a switch may both find it dead.
        self._boot_locks = {slot.index: asyncio.Lock() for slot in slots}
        # Lifecycle only (start ran, shutdown not yet): whether the engines are alive is
        # their processes' business (health, crashed).
        self.started = False
        self._stopping = False
        self.name = key

    # --- lifecycle
    async def start(self) -> None:
        async with self._start_lock:
            if self.started:
                return
            self._stopping = False
            for slot in self.slots:  # one at a time: two engine starts on few cores thrash
                await self._boot_if_needed(slot)
            self.started = True

    @property
    def crashed(self) -> bool:
        """A slot's engine died after the group started (the supervisor's question)."""
        return self.started and not self._stopping and any(s.needs_boot for s in self.slots)

    async def restart(self) -> None:
        """Boot every slot whose engine died, with its boot weights, and let waiting requests
        in (the supervisor's call)."""
        for slot in self.slots:
            if self._stopping:
                return
            if slot.needs_boot:
                log.warning("slot %s of %s restarts its engine", slot.index, self.key)
                await self._boot_if_needed(slot)
                self.scheduler.dispatch()

    async def health(self) -> EngineHealth:
        """Up while any slot's engine is up (any slot can take any of the group's experts);
        the reason names the slots that are not."""
        states = [await engine_health(s.engine) for s in self.slots]  # type: ignore[arg-type]
        if not self.started:
            if self._start_lock.locked():
                return EngineHealth("starting")
            return EngineHealth("down", "stopped" if self._stopping else "not started")
        down = [(i, h) for i, h in enumerate(states) if not h.up]
        if not down:
            return UP
        if len(down) < len(states):
            return EngineHealth("up", f"{len(down)} of {len(states)} slots restarting")
        if any(h.state == "starting" for _, h in down):
            return EngineHealth("starting", "restarting after a crash")
        return EngineHealth("down", down[0][1].reason)

    async def _boot_if_needed(self, slot: Slot) -> None:
        async with self._boot_locks[slot.index]:
            if slot.needs_boot:
                await self._boot(slot)

    async def _boot(self, slot: Slot) -> None:
        # A fresh engine: whatever the old one's worker held is gone.
        self.residency.slot_restarted(self.units, slot.index)
        await slot.boot()
        if self.residency[slot.boot_unit].resident_slot is not None:
            # Another slot serves these weights: this one loads something else before use.
            slot.set_resident(None)
        else:
            self.residency.mark_resident(slot.boot_unit, slot.index, swapped_in=False)
            if self.residency.engine_layout_factor is None:
                engine_bytes = await slot.worker.engine_bytes()
                self.residency.learn_engine_layout(slot.boot_unit, engine_bytes)
            await self.host.capture(slot, slot.boot_unit)
        self.residency.publish()

    async def shutdown(self) -> None:
        self._stopping = True
        if not self.started and not any(s.engine.ready for s in self.slots):
            return
        self.started = False
        await self.scheduler.close()
        self.host.cancel_reads()
        await asyncio.gather(*(s.engine.shutdown() for s in self.slots))

    # --- requests
    async def stream(
        self, expert: str, prompt: Prompt, sampling: SamplingParams, request_id: str | None
    ) -> AsyncIterator[Chunk]:
        if not self.started:
            await self.start()
        unit = self.unit_of[expert]
        self.residency.note_request(unit)
        self.prefetch(unit)
        slot = await self.scheduler.acquire(
            unit, work=sampling.max_tokens, wait_s=self.queue_s.get(expert), name=expert
        )
        try:
            if slot.resident != unit:  # the scheduler's promise; never serve the wrong weights
                raise EngineError(
                    f"slot {slot.index} holds {slot.resident}, not {unit}", retryable=True
                )
            # aclosing: if the caller goes away, the engine aborts the request before the slot
            # is released (and may switch), so no request of this expert outlives its turn.
            stream = slot.engine.stream(prompt, sampling, request_id)
            async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    yield chunk
            self.residency.note_hit(unit)
        finally:
            self.scheduler.release(slot)

    # --- the Switcher protocol
    def switch_seconds(self, unit: str) -> float:
        return self.residency.switch_seconds(unit)

    def can_serve(self, unit: str, slot: int) -> bool:
        """A host copy in a slot's worker serves only that slot (unless that slot is down)."""
        home = self.residency[unit].host_slot
        return home is None or home == slot or self.slots[home].needs_boot

    async def make_resident(self, slot: Slot, unit: str) -> None:
        if slot.needs_boot:
            log.warning("slot %s of %s restarts its engine", slot.index, self.key)
            await self._boot_if_needed(slot)
        if slot.resident == unit:
            return
        record = self.residency[unit]
        source = record.tier
        t0 = time.perf_counter()
        await self.host.wait_for_read(unit)  # a prefetch is reading it: not a second read
        if record.failed and record.host_slot is None:
            raise EngineError(
                f"expert weights {unit} could not be loaded from {self.units[unit].path}: "
                f"{record.failed}"
            )
        if record.host_slot is not None and record.host_slot != slot.index:
            # The prefetch put it in another slot's worker; this slot needs its own copy.
            await self.host.drop(self.slots[record.host_slot], unit)
        if record.host_slot != slot.index:
            await self.host.load(slot, unit, below=None)  # False: no room, read from disk
        previous = slot.resident
        # Unknown until the move completes: if it fails half-way, nobody is resident.
        slot.set_resident(None)
        if previous is not None:
            self.residency.mark_not_resident(previous)
        try:
            if record.host_slot == slot.index:
                info = await slot.worker.activate(unit)
            else:
                info = await slot.worker.load_path(self.units[unit].path)
        except EngineError:
            raise
        except Exception as exc:
            if record.host_slot == slot.index and record.host_layout == "checkpoint":
                await self.host.drop(slot, unit)
            raise EngineError(
                f"expert weights {unit} could not be loaded from {self.units[unit].path}: {exc}"
            ) from exc
        await slot.engine.reset_prefix_cache()
        self.residency.mark_resident(unit, slot.index, swapped_in=True)
        slot.set_resident(unit)
        seconds = time.perf_counter() - t0
        if info.get("layout") == "engine":
            self.residency.bandwidth.observe("host_to_hbm", record.host_bytes, info["seconds"])
        else:
            self.residency.bandwidth.observe("convert", record.disk_bytes, info["seconds"])
            if record.host_layout != "engine":
                await self.host.capture(slot, unit)
        self.residency.record_move(unit, source, Tier.HBM, seconds)
        log.info("slot %s: %s -> %s in %.3f s (%s)", slot.index, previous, unit, seconds, source)

    # --- host tier
    def prefetch(self, unit: str) -> None:
        """The router named this checkpoint: start reading it into host RAM if it is only on
        disk and room can be made without evicting anything worth more."""
        if self.started:
            self.host.prefetch(unit)

    def _busy_units(self) -> set[str]:
        """Checkpoints with queued requests or a switch under way, in every group: evicting
        their host copy now would only mean reading them again in a moment."""
        busy: set[str] = set()
        for group in {id(g): g for g in [self, *self.residency.owners.values()]}.values():
            busy |= group.scheduler.busy()
        return busy

    def status(self) -> list[dict[str, object]]:
        rows = []
        for unit in self.units.values():
            row = self.residency[unit.name].as_dict()
            row["experts"] = list(unit.experts)
            row["group"] = self.key
            row["queued"] = self.scheduler.waiting(unit.name)
            rows.append(row)
        return rows


def unit_signature(path: str, dtype: str) -> str | None:
    try:
        return architecture_signature(path, dtype)
    except SignatureError:
        return None


class SlotExpertEngine:
    """One expert of experts.yaml served through its slot group (the Engine protocol)."""

    def __init__(self, name: str, group: SlotGroup):
        self.name = name
        self.group = group

    @property
    def ready(self) -> bool:
        return self.group.started and any(s.engine.ready for s in self.group.slots)

    async def start(self) -> None:
        await self.group.start()

    async def health(self) -> EngineHealth:
        return await self.group.health()

    def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        return self.group.stream(self.name, prompt, sampling, request_id)

    def prefetch(self) -> None:
        if self.group.started:
            self.group.prefetch(self.group.unit_of[self.name])

    async def shutdown(self) -> None:
        await self.group.shutdown()


def new_record(unit: Unit, disk_bytes: int) -> ExpertResidency:
    return ExpertResidency(name=unit.name, path=unit.path, disk_bytes=disk_bytes)
