"""A slot: one live vLLM engine that holds one expert's weights at a time."""

from __future__ import annotations

from collections.abc import Callable

from coe.cache.rpc import WorkerClient
from coe.engines.vllm_local import VllmLocalEngine, VllmSpec

WORKER_EXTENSION = "coe.cache.worker.SlotWorker"

# Builds the engines the weight cache runs itself (slots, and sleeping solo engines):
# (name, spec with the worker extension, autostart) -> engine. Tests inject fakes.
SlotEngineFactory = Callable[[str, VllmSpec, bool], VllmLocalEngine]


def vllm_slot_engine(name: str, spec: VllmSpec, autostart: bool) -> VllmLocalEngine:
    """The default slot engine factory: an in-process vLLM engine."""
    return VllmLocalEngine(name, spec, autostart=autostart)


class Slot:
    def __init__(self, index: int, engine: VllmLocalEngine, boot_unit: str):
        self.index = index
        self.engine = engine
        # The slot worker's RPCs (coe.cache.worker.SlotWorker) in this engine.
        self.worker = WorkerClient(engine)
        # The weights the engine loads when it (re)starts.
        self.boot_unit = boot_unit
        self.in_flight = 0
        # Requests the engine runs at once; the scheduler admits no more than this.
        self.capacity = engine.spec.options.max_num_seqs
        self._resident: str | None = None
        self._starts_seen = -1

    @property
    def needs_boot(self) -> bool:
        """True before the first start and after the engine died (it restarts with boot weights,
        and its worker's host tier is gone)."""
        return not (self.engine.ready and self.engine.starts == self._starts_seen)

    @property
    def resident(self) -> str | None:
        return None if self.needs_boot else self._resident

    def set_resident(self, unit: str | None) -> None:
        self._resident = unit

    async def boot(self) -> None:
        await self.engine.start()
        self._starts_seen = self.engine.starts
        self._resident = self.boot_unit

    def __repr__(self) -> str:
        return f"Slot({self.index}, resident={self._resident}, in_flight={self.in_flight})"
