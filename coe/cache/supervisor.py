"""Restarts crashed in-process engines at once, instead of leaving the restart to whichever
request finds the engine dead next (which would then wait the whole start, ~35 s on a CPU).

The supervisor polls each member's ``crashed`` (cheap: vLLM marks an engine dead the moment its
core process exits) and restarts crashed members one at a time: two engine starts at once on a
few cores only thrash. A restart that fails is retried after a delay that doubles from
``backoff_s`` up to ``max_backoff_s``; a success resets it.

Shutdown order matters: ``stop()`` first (no new restarts; one under way finishes, so no engine
is left half-created), then the engines. Members refuse a restart once they are shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from prometheus_client import Counter

log = logging.getLogger(__name__)

RESTARTS = Counter(
    "coe_engine_restarts", "Restarts of crashed engines by the supervisor.", ["engine", "outcome"]
)


@runtime_checkable
class Supervised(Protocol):
    """An engine (or a slot group) that runs in this process and can be restarted."""

    name: str

    @property
    def crashed(self) -> bool:
        """It was running, its process has gone, and nobody is shutting it down."""
        ...

    async def restart(self) -> None:
        """Start it again; raise if it cannot start. A no-op if it is up or stopping."""
        ...


def backoff_delay(failures: int, base_s: float, max_s: float) -> float:
    """Seconds to wait after the ``failures``-th failed restart in a row (1, 2, 4, ... max)."""
    return min(max_s, base_s * 2 ** max(0, failures - 1))


@dataclass
class Watch:
    """The supervisor's record of one member."""

    member: Supervised
    failures: int = 0  # failed restarts in a row
    next_try: float = 0.0  # monotonic time before which no restart is tried
    restarts: int = 0  # successful restarts
    last_error: str | None = None


class Supervisor:
    def __init__(
        self,
        members: Iterable[Supervised],
        *,
        interval_s: float = 0.25,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.watches = [Watch(m) for m in members]
        self.interval_s = interval_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start watching, on the running event loop (the one the engines live on)."""
        if self.running or not self.watches:
            return
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="coe-supervisor")

    async def stop(self) -> None:
        """Stop watching. A restart under way completes first (a half-created engine would
        outlive the pool); none starts after this is called."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.check()
            except Exception:  # a bug here must not end supervision for good
                log.exception("engine supervisor pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def check(self) -> None:
        """One pass: restart every crashed member whose back-off has run out."""
        for watch in self.watches:
            if self._stop.is_set():
                return
            if not watch.member.crashed or self.clock() < watch.next_try:
                continue
            await self._restart(watch)

    async def _restart(self, watch: Watch) -> None:
        name = watch.member.name
        log.warning("engine %s crashed; restarting it now", name)
        t0 = self.clock()
        try:
            await watch.member.restart()
        except Exception as exc:
            watch.failures += 1
            watch.last_error = f"{type(exc).__name__}: {exc}"
            delay = backoff_delay(watch.failures, self.backoff_s, self.max_backoff_s)
            watch.next_try = self.clock() + delay
            RESTARTS.labels(name, "failed").inc()
            log.warning(
                "engine %s failed to restart (%s); next try in %.0f s",
                name,
                watch.last_error,
                delay,
            )
            return
        watch.failures, watch.next_try, watch.last_error = 0, 0.0, None
        watch.restarts += 1
        RESTARTS.labels(name, "restarted").inc()
        log.warning("engine %s restarted in %.1f s", name, self.clock() - t0)
