"""An expert engine, as the gateway replicas see it: a stream from an expert deployment.

The Engine protocol over a Serve deployment handle: ``stream`` calls the deployment's
``generate`` (its replica chosen by coe.cluster.request_router), ``prefetch`` tells the
replica the next request will land on to start moving the expert up, ``health`` asks a replica.

Ray's failures become coe's: a replica (or its node) that dies is an EngineError, retried on
another replica once when nothing was streamed yet; the orchestrator's deadlines bound the wait
for a replica, so a deployment with none left answers 503/504, not a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from coe.cluster.replica import chunk_from_wire, prompt_to_wire, sampling_to_wire
from coe.engines.base import DeadlineError, EngineError, EngineHealth
from coe.types import Chunk, Prompt, SamplingParams

log = logging.getLogger(__name__)

# A replica lost before the first chunk: try the request on another this many times more.
RETRIES_BEFORE_FIRST_CHUNK = 1
HEALTH_TIMEOUT_S = 2.0
HEALTH_CACHE_S = 3.0


def replica_lost(exc: BaseException) -> bool:
    """Whether Ray says the replica (its actor, its node) is gone, not that the request failed."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError)


class ServeEngine:
    """One expert of an expert deployment, called through the deployment's handle."""

    def __init__(
        self, name: str, deployment: str, handle: Any, queue_s: float, *, prefetches: bool = False
    ):
        self.name = name
        self.deployment = deployment
        self._handle = handle
        # How long a request may wait for a replica to take it (the expert's deadlines.queue_s).
        self.queue_s = queue_s
        # Only replicas that move weights gain from a prefetch; for the others it is a wasted
        # actor call on every request.
        self.prefetches = prefetches
        self._health: tuple[float, EngineHealth] | None = None

    @property
    def ready(self) -> bool:
        return self._health is None or self._health[1].up

    async def start(self) -> None:
        """Nothing to start here: the deployment's replicas start their own engines."""

    async def health(self) -> EngineHealth:
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_CACHE_S:
            return self._health[1]
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                states = await self._handle.health.remote()
            own = states.get(self.name, {"state": "down", "reason": "not served"})
            found = EngineHealth(own["state"], own["reason"])
        except TimeoutError:
            found = EngineHealth("down", f"no replica of {self.deployment} answered")
        except Exception as exc:  # a Ray error: the deployment has no live replica
            log.warning("health of %s: %s", self.deployment, exc)
            found = EngineHealth("down", f"deployment {self.deployment} unreachable")
        self._health = (now, found)
        return found

    def prefetch(self) -> None:
        """The request router sends this where the request itself will go (it remembers)."""
        if self.prefetches:
            self._handle.prefetch.remote(expert=self.name)

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        wire_prompt, wire_sampling = prompt_to_wire(prompt), sampling_to_wire(sampling)
        for attempt in range(RETRIES_BEFORE_FIRST_CHUNK + 1):
            produced = False
            chunks = self._handle.options(stream=True).generate.remote(
                expert=self.name, prompt=wire_prompt, sampling=wire_sampling, request_id=request_id
            )
            try:
                await self._routed(chunks)
                async for data in chunks:
                    produced = True
                    yield chunk_from_wire(data)
                return
            except (asyncio.CancelledError, GeneratorExit):
                chunks.cancel()  # the caller left (or a deadline passed): stop the replica's work
                raise
            except EngineError:  # a DeadlineError, or the replica's own refusal
                raise
            except Exception as exc:
                if not replica_lost(exc):
                    raise EngineError(f"expert {self.name}: {exc}") from exc
                if produced or attempt == RETRIES_BEFORE_FIRST_CHUNK:
                    raise EngineError(
                        f"expert {self.name}: its replica in {self.deployment} was lost",
                        retryable=not produced,
                    ) from exc
                log.warning("replica of %s lost before its first chunk; retrying", self.name)

    async def _routed(self, chunks: Any) -> None:
        """Wait until Serve has handed the request to a replica: with none alive (or all full)
        it would retry for ever. Ray 2.60 exposes the assignment only as this private future
        (the version is pinned in pyproject.toml's ray extra)."""
        try:
            async with asyncio.timeout(self.queue_s):
                await chunks._fetch_future_result_async()
        except TimeoutError:
            chunks.cancel()
            raise DeadlineError(self.name, "queue", self.queue_s) from None

    async def shutdown(self) -> None:
        """The deployment's replicas are Serve's to stop."""
