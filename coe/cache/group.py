"""A slot group: the experts that share one architecture, served by fewer engines than experts.

The unit of residency is a *checkpoint* (several experts of experts.yaml may be configurations of
one checkpoint; they share its weights and its queue). The group implements the scheduler's
``Switcher``: it moves a checkpoint's weights into a slot along the fastest path it has.

- HOST (engine layout) → HBM: a copy per parameter (``coe_activate``).
- HOST (checkpoint layout) → HBM: vLLM ``reload_weights`` from the staged tensors, then the
  engine layout is captured for next time.
- DISK → HBM: staged into the host tier first when the budget allows (so a missing or corrupt
  checkpoint fails before the engine is touched), else read straight into the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from coe.cache.residency import ResidencyManager
from coe.cache.scheduler import Policy, Scheduler
from coe.cache.signature import SignatureError, architecture_signature
from coe.cache.slot import Slot
from coe.cache.tiers import ExpertResidency, Tier
from coe.engines.base import EngineError
from coe.types import Chunk, Prompt, SamplingParams

log = logging.getLogger(__name__)
POLL_S = 0.02


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
        policy: Policy = "grouped",
    ):
        self.key = key
        self.units = {u.name: u for u in units}
        self.unit_of = {e: u.name for u in units for e in u.experts}
        self.slots = slots
        self.residency = residency
        self.scheduler = Scheduler(slots, self, max_wait_s=max_wait_s, policy=policy)
        self._start_lock = asyncio.Lock()
        self._staging: dict[str, asyncio.Task[None]] = {}
        self.started = False

    # --- lifecycle
    async def start(self) -> None:
        async with self._start_lock:
            if self.started:
                return
            for slot in self.slots:  # one at a time: two engine starts on few cores thrash
                await self._boot(slot)
            self.started = True

    async def _boot(self, slot: Slot) -> None:
        # A fresh engine: whatever the old one's worker held is gone.
        for r in self.residency.records.values():
            if r.name not in self.units:
                continue
            if r.resident_slot == slot.index:
                r.resident_slot = None
            if r.host_slot == slot.index:
                r.forget_host()
        await slot.boot()
        boot = self.residency[slot.boot_unit]
        if boot.resident_slot is not None:
            # Another slot serves these weights: this one loads something else before use.
            slot.set_resident(None)
        else:
            boot.resident_slot = slot.index
            if self.residency.engine_layout_factor is None:
                engine_bytes = await slot.rpc("coe_engine_bytes")
                self.residency.engine_layout_factor = engine_bytes / max(1, boot.disk_bytes)
            await self._capture(slot, slot.boot_unit)
        self.residency.publish()

    async def shutdown(self) -> None:
        if not self.started and not any(s.engine.ready for s in self.slots):
            return
        self.started = False
        await self.scheduler.close()
        for task in list(self._staging.values()):
            task.cancel()
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
        slot = await self.scheduler.acquire(unit, work=sampling.max_tokens)
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
            self.residency[unit].hits += 1
            self.residency.notify()
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
            await self._boot(slot)
        if slot.resident == unit:
            return
        record = self.residency[unit]
        source = record.tier
        t0 = time.perf_counter()
        staging = self._staging.get(unit)
        if staging is not None:  # a prefetch is reading it: wait for that read, not a second one
            with contextlib.suppress(EngineError):
                await asyncio.shield(staging)
        if record.failed and record.host_slot is None:
            raise EngineError(
                f"expert weights {unit} could not be loaded from {self.units[unit].path}: "
                f"{record.failed}"
            )
        if record.host_slot is not None and record.host_slot != slot.index:
            # The prefetch put it in another slot's worker; this slot needs its own copy.
            await self._drop(self.slots[record.host_slot], unit)
        if record.host_slot != slot.index:
            await self._start_load(slot, unit, below=None)  # False: no room, read from disk
        previous = slot.resident
        # Unknown until the move completes: if it fails half-way, nobody is resident.
        slot.set_resident(None)
        if previous is not None:
            self.residency[previous].resident_slot = None
        try:
            if record.host_slot == slot.index:
                info = await slot.rpc("coe_activate", unit)
            else:
                info = await slot.rpc("coe_load_path", self.units[unit].path)
        except EngineError:
            raise
        except Exception as exc:
            if record.host_slot == slot.index and record.host_layout == "checkpoint":
                await self._drop(slot, unit)
            raise EngineError(
                f"expert weights {unit} could not be loaded from {self.units[unit].path}: {exc}"
            ) from exc
        await slot.engine.reset_prefix_cache()
        record.resident_slot = slot.index
        record.swaps_in += 1
        slot.set_resident(unit)
        seconds = time.perf_counter() - t0
        if info.get("layout") == "engine":
            self.residency.bandwidth.observe("host_to_hbm", record.host_bytes, info["seconds"])
        else:
            self.residency.bandwidth.observe("convert", record.disk_bytes, info["seconds"])
            if record.host_layout != "engine":
                await self._capture(slot, unit)
        self.residency.record_move(unit, source, Tier.HBM, seconds)
        log.info("slot %s: %s -> %s in %.3f s (%s)", slot.index, previous, unit, seconds, source)

    # --- host tier
    def prefetch(self, unit: str) -> None:
        """The router named this checkpoint: start reading it into host RAM if it is only on
        disk and room can be made without evicting anything worth more."""
        record = self.residency[unit]
        busy = record.tier is not Tier.DISK or record.host_slot is not None
        if busy or unit in self._staging or not self.started:
            return
        slot = min(self.slots, key=lambda s: (s.needs_boot, self._host_bytes_in(s.index)))
        self._start_load(slot, unit, below=self.residency.expected_cost(unit))

    def _start_load(self, slot: Slot, unit: str, below: float | None) -> asyncio.Task[bool]:
        """DISK → HOST as a task of its own, registered so that nobody starts a second one."""
        task = asyncio.get_running_loop().create_task(self._load_to_host(slot, unit, below))
        self._staging[unit] = task

        def done(finished: asyncio.Task[bool]) -> None:
            if self._staging.get(unit) is finished:
                del self._staging[unit]
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("reading %s into host RAM failed: %s", unit, finished.exception())

        task.add_done_callback(done)
        return task

    async def _load_to_host(self, slot: Slot, unit: str, below: float | None) -> bool:
        """False if no room could be made; raises EngineError if the checkpoint is unreadable."""
        if not await self._reserve_host(slot, unit, "checkpoint", below):
            return False
        await self._stage(slot, unit)
        return True

    async def _reserve_host(
        self, slot: Slot, unit: str, layout: str, below: float | None = None
    ) -> bool:
        """Make room for `unit` in `slot`'s host tier and claim it.

        Victims are unclaimed and the room claimed before the first await, so concurrent
        reservations (a prefetch, another slot's switch) never count the same free bytes twice.
        """
        need = self.residency.host_estimate(unit, layout)
        protect = {unit} | self._busy_units()
        victims = self.residency.host_victims(need, protect=protect, below=below)
        if victims is None:
            return False
        dropped: list[tuple[Slot, str]] = []
        for victim in victims:
            v = self.residency[victim]
            owner: SlotGroup = self.residency.owners.get(victim, self)
            assert v.host_slot is not None
            dropped.append((owner.slots[v.host_slot], victim))
            v.forget_host()
        record = self.residency[unit]
        record.host_slot, record.host_layout, record.host_bytes = slot.index, layout, need
        record.loading = layout == "checkpoint"
        for victim_slot, victim in dropped:
            if not victim_slot.needs_boot:
                await victim_slot.rpc("coe_drop", victim)
            self.residency.record_move(victim, Tier.HOST, Tier.DISK, 0.0)
        return True

    def _busy_units(self) -> set[str]:
        """Checkpoints with queued requests or a switch under way, in every group: evicting
        their host copy now would only mean reading them again in a moment."""
        busy: set[str] = set()
        for group in {id(g): g for g in [self, *self.residency.owners.values()]}.values():
            busy |= group.scheduler.busy()
        return busy

    async def _stage(self, slot: Slot, unit: str) -> None:
        """DISK → HOST into the room `_reserve_host` claimed: the worker reads the checkpoint in
        a thread; poll (without blocking the engine's loop) until it is done. Raises EngineError
        if the checkpoint cannot be read."""
        record = self.residency[unit]
        t0 = time.perf_counter()
        try:
            await slot.rpc("coe_stage", unit, self.units[unit].path)
            while True:
                state = await slot.rpc("coe_wait_staged", unit, 0.0)
                if state["state"] == "staged":
                    record.loading = False
                    record.host_bytes = state["bytes"]
                    self.residency.bandwidth.observe(
                        "disk_to_host", state["bytes"], state["seconds"]
                    )
                    self.residency.record_move(unit, Tier.DISK, Tier.HOST, time.perf_counter() - t0)
                    return
                if state["state"] != "loading":
                    record.failed = state.get("error", "the host copy disappeared")
                    raise EngineError(
                        f"expert weights {unit} could not be loaded from "
                        f"{self.units[unit].path}: {record.failed}"
                    )
                await asyncio.sleep(POLL_S)
        except BaseException:
            if record.host_slot == slot.index and record.host_layout == "checkpoint":
                record.forget_host()
            record.loading = False
            self.residency.publish()
            raise

    async def _capture(self, slot: Slot, unit: str) -> None:
        """Keep the engine-layout copy of the checkpoint resident in `slot` if the host budget
        allows. It replaces any other host copy of the checkpoint."""
        record = self.residency[unit]
        staged_here = record.host_slot == slot.index and record.host_layout == "checkpoint"
        if record.host_slot is not None and record.host_slot != slot.index:
            await self._drop(self.slots[record.host_slot], unit)
        record.forget_host()  # the capture replaces whatever copy there was
        if not await self._reserve_host(slot, unit, "engine"):
            if staged_here and not slot.needs_boot:
                await slot.rpc("coe_drop", unit)
            log.info("host tier full: %s stays only in slot %s", unit, slot.index)
            self.residency.publish()
            return
        try:
            info = await slot.rpc("coe_capture", unit)  # also frees the staged copy
        except BaseException:
            record.forget_host()
            raise
        record.host_bytes = info["bytes"]
        self.residency.publish()

    async def _drop(self, slot: Slot, unit: str) -> None:
        self.residency[unit].forget_host()
        if not slot.needs_boot:
            await slot.rpc("coe_drop", unit)

    def _host_bytes_in(self, index: int) -> int:
        return sum(r.host_bytes for r in self.residency.records.values() if r.host_slot == index)

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
        return self.group.started

    async def start(self) -> None:
        await self.group.start()

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
