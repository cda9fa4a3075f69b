"""The slot worker's RPC surface as typed calls: `WorkerClient` on the serving side, the answer
shapes shared with `coe.cache.worker.SlotWorker`, which runs inside vLLM's worker process.

vLLM reaches a worker extension's methods by name (``collective_rpc``); keeping those names in
this one class means a renamed or re-shaped worker method breaks here, not at a call site.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, Protocol, TypedDict, cast


class StageState(TypedDict):
    """Where a DISK → HOST read stands."""

    state: Literal["absent", "loading", "failed", "staged"]
    error: NotRequired[str]  # failed
    bytes: NotRequired[int]  # staged
    seconds: NotRequired[float]  # staged


class Capture(TypedDict):
    """An engine-layout copy taken of the engine's current weights."""

    bytes: int
    params: int
    linears: int


class Activation(TypedDict):
    """A host copy or a checkpoint made the engine's weights."""

    layout: Literal["engine", "checkpoint"]
    seconds: float
    copied_bytes: NotRequired[int]  # engine layout
    rebound_linears: NotRequired[int]  # engine layout


class RpcEngine(Protocol):
    """An engine whose worker runs the slot worker extension (VllmLocalEngine)."""

    async def rpc(self, method: str, *args: Any) -> Any: ...


class WorkerClient:
    """Calls the methods of `coe.cache.worker.SlotWorker` in an engine's worker."""

    def __init__(self, engine: RpcEngine):
        self.engine = engine

    async def call(self, method: str, *args: Any) -> Any:
        return await self.engine.rpc(method, *args)

    async def stage(self, expert: str, path: str, drop_cache: bool = False) -> None:
        """Start reading a checkpoint into the worker's host tier (DISK → HOST)."""
        await self.call("coe_stage", expert, path, drop_cache)

    async def wait_staged(self, expert: str, timeout: float | None = None) -> StageState:
        return cast(StageState, await self.call("coe_wait_staged", expert, timeout))

    async def engine_bytes(self) -> int:
        """Bytes one expert takes in engine layout."""
        return int(await self.call("coe_engine_bytes"))

    async def capture(self, expert: str) -> Capture:
        return cast(Capture, await self.call("coe_capture", expert))

    async def drop(self, expert: str) -> int:
        """Evict an expert from the worker's host tier; the bytes freed."""
        return int(await self.call("coe_drop", expert))

    async def activate(self, expert: str) -> Activation:
        """Make the expert's host copy the engine's weights (HOST → HBM)."""
        return cast(Activation, await self.call("coe_activate", expert))

    async def load_path(self, path: str) -> Activation:
        """Make a checkpoint folder the engine's weights (DISK → HBM)."""
        return cast(Activation, await self.call("coe_load_path", path))
