"""One slot group's share of the host tier: the copies of its checkpoints that its slot workers
keep in host RAM, within the one budget the ResidencyManager keeps for every group.

- DISK → HOST: a read staged in a slot's worker (for a prefetch, or before a switch), run as a
  task of its own so that nobody starts a second read of the same checkpoint.
- HBM → HOST: the engine-layout copy captured after a checkpoint's first load.
- Evictions: the cheapest host copies go (in any group) to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from coe.cache.residency import ResidencyManager
from coe.cache.slot import Slot
from coe.cache.tiers import Tier
from coe.engines.base import EngineError

log = logging.getLogger(__name__)
POLL_S = 0.02


class HostTier:
    def __init__(
        self,
        slots: list[Slot],
        paths: dict[str, str],
        residency: ResidencyManager,
        busy_units: Callable[[], set[str]],
    ):
        self.slots = slots
        self.paths = paths  # checkpoint folder of each unit
        self.residency = residency
        # Checkpoints whose host copy must not be evicted now (queued or switching anywhere).
        self.busy_units = busy_units
        self._reading: dict[str, asyncio.Task[bool]] = {}

    def prefetch(self, unit: str) -> None:
        """Start reading `unit` into host RAM if it is only on disk and room can be made
        without evicting anything worth more."""
        record = self.residency[unit]
        busy = record.tier is not Tier.DISK or record.host_slot is not None
        if busy or unit in self._reading:
            return
        slot = min(self.slots, key=lambda s: (s.needs_boot, self.bytes_in(s.index)))
        self.load(slot, unit, below=self.residency.expected_cost(unit))

    def load(self, slot: Slot, unit: str, below: float | None) -> asyncio.Task[bool]:
        """DISK → HOST as a task of its own, registered so that nobody starts a second one.
        The task's result is False if no room could be made (worth less than `below`)."""
        task = asyncio.get_running_loop().create_task(self._load(slot, unit, below))
        self._reading[unit] = task

        def done(finished: asyncio.Task[bool]) -> None:
            if self._reading.get(unit) is finished:
                del self._reading[unit]
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("reading %s into host RAM failed: %s", unit, finished.exception())

        task.add_done_callback(done)
        return task

    async def wait_for_read(self, unit: str) -> None:
        """If a read of `unit` is under way (a prefetch), wait for it rather than start a second
        one; its failure shows in the residency record."""
        reading = self._reading.get(unit)
        if reading is not None:
            with contextlib.suppress(EngineError):
                await asyncio.shield(reading)

    def cancel_reads(self) -> None:
        for task in list(self._reading.values()):
            task.cancel()

    async def _load(self, slot: Slot, unit: str, below: float | None) -> bool:
        """False if no room could be made; raises EngineError if the checkpoint is unreadable."""
        if not await self._reserve(slot, unit, "checkpoint", below):
            return False
        await self._stage(slot, unit)
        return True

    async def _reserve(
        self, slot: Slot, unit: str, layout: str, below: float | None = None
    ) -> bool:
        """Make room for `unit` in `slot`'s host tier and claim it.

        Victims are unclaimed and the room claimed before the first await, so concurrent
        reservations (a prefetch, another slot's switch) never count the same free bytes twice.
        """
        need = self.residency.host_estimate(unit, layout)
        protect = {unit} | self.busy_units()
        victims = self.residency.host_victims(need, protect=protect, below=below)
        if victims is None:
            return False
        dropped: list[tuple[Slot, str]] = []
        for victim in victims:
            host_slot = self.residency[victim].host_slot
            assert host_slot is not None
            # A victim may belong to another group: its own slots hold its copy.
            owner = self.residency.owners.get(victim)
            slots: list[Slot] = owner.slots if owner is not None else self.slots
            dropped.append((slots[host_slot], victim))
            self.residency.forget_host(victim)
        self.residency.claim_host(unit, slot.index, layout, need)
        for victim_slot, victim in dropped:
            if not victim_slot.needs_boot:
                await victim_slot.worker.drop(victim)
            self.residency.record_move(victim, Tier.HOST, Tier.DISK, 0.0)
        return True

    async def _stage(self, slot: Slot, unit: str) -> None:
        """DISK → HOST into the room `_reserve` claimed: the worker reads the checkpoint in a
        thread; poll (without blocking the engine's loop) until it is done. Raises EngineError
        if the checkpoint cannot be read."""
        record = self.residency[unit]
        t0 = time.perf_counter()
        try:
            await slot.worker.stage(unit, self.paths[unit])
            while True:
                state = await slot.worker.wait_staged(unit, 0.0)
                if state["state"] == "staged":
                    self.residency.staged(unit, state["bytes"])
                    self.residency.bandwidth.observe(
                        "disk_to_host", state["bytes"], state["seconds"]
                    )
                    self.residency.record_move(unit, Tier.DISK, Tier.HOST, time.perf_counter() - t0)
                    return
                if state["state"] != "loading":
                    error = state.get("error", "the host copy disappeared")
                    self.residency.load_failed(unit, error)
                    raise EngineError(
                        f"expert weights {unit} could not be loaded from {self.paths[unit]}: "
                        f"{error}"
                    )
                await asyncio.sleep(POLL_S)
        except BaseException:
            if record.host_slot == slot.index and record.host_layout == "checkpoint":
                self.residency.forget_host(unit)
            self.residency.stop_loading(unit)
            self.residency.publish()
            raise

    async def capture(self, slot: Slot, unit: str) -> None:
        """Keep the engine-layout copy of the checkpoint resident in `slot` if the host budget
        allows. It replaces any other host copy of the checkpoint."""
        record = self.residency[unit]
        staged_here = record.host_slot == slot.index and record.host_layout == "checkpoint"
        if record.host_slot is not None and record.host_slot != slot.index:
            await self.drop(self.slots[record.host_slot], unit)
        self.residency.forget_host(unit)  # the capture replaces whatever copy there was
        if not await self._reserve(slot, unit, "engine"):
            if staged_here and not slot.needs_boot:
                await slot.worker.drop(unit)
            log.info("host tier full: %s stays only in slot %s", unit, slot.index)
            self.residency.publish()
            return
        try:
            info = await slot.worker.capture(unit)  # also frees the staged copy
        except BaseException:
            self.residency.forget_host(unit)
            raise
        self.residency.captured(unit, info["bytes"])
        self.residency.publish()

    async def drop(self, slot: Slot, unit: str) -> None:
        self.residency.forget_host(unit)
        if not slot.needs_boot:
            await slot.worker.drop(unit)

    def bytes_in(self, index: int) -> int:
        """Host bytes held by slot `index`'s worker."""
        records = self.residency.records.values()
        return sum(r.host_bytes for r in records if r.host_slot == index)
