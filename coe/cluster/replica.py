"""One replica of an expert deployment: coe's own engines and weight cache for the deployment's
experts, inside a Ray Serve replica.

The gateway replicas call ``generate`` through a deployment handle (coe.cluster.serve_engine);
Serve asks ``record_routing_stats`` every few seconds and hands the answer to the request router
(coe.cluster.request_router), which sends each request where its expert already is.

Engines start in the constructor: Serve routes nothing to a replica before its constructor
returns, so no request waits on (or fails with) an engine still starting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from coe.cache.pool import EnginePool
from coe.cache.tiers import Tier
from coe.config import load_config
from coe.engines.base import EngineError
from coe.types import (
    Chunk,
    Message,
    Prompt,
    ResponseFormat,
    SamplingParams,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)

log = logging.getLogger(__name__)


def _message_from_wire(m: dict[str, Any]) -> Message:
    calls = tuple(
        ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
        for c in m.get("tool_calls", ())
    )
    return Message(m["role"], m["content"], calls, m.get("tool_call_id"))


def prompt_from_wire(data: dict[str, Any]) -> Prompt:
    messages = tuple(_message_from_wire(m) for m in data["messages"])
    tools = data.get("tools")
    spec = None
    if tools is not None:
        spec = ToolSpec(**{**tools, "tools": tuple(Tool(**t) for t in tools["tools"])})
    return Prompt(messages=messages, format=data["format"], tools=spec)


def prompt_to_wire(prompt: Prompt) -> dict[str, Any]:
    return {
        "messages": [m.as_dict() for m in prompt.messages],
        "format": prompt.format,
        "tools": asdict(prompt.tools) if prompt.tools is not None else None,
    }


def sampling_to_wire(sampling: SamplingParams) -> dict[str, Any]:
    return asdict(sampling)


def sampling_from_wire(data: dict[str, Any]) -> SamplingParams:
    fields = {**data, "stop": tuple(data.get("stop", ()))}
    fields["logit_bias"] = tuple((int(t), float(b)) for t, b in data.get("logit_bias", ()))
    fmt = data.get("response_format")
    fields["response_format"] = ResponseFormat(**fmt) if fmt is not None else None
    return SamplingParams(**fields)


class ExpertReplica:
    """A Serve replica serving some experts of experts.yaml (the deployment's ``experts:``)."""

    async def __init__(self, config_path: str, deployment: str):
        from ray import serve

        from coe.models import ensure_models

        config = load_config(config_path)
        spec = next(d for d in config.cluster_deployments if d.name == deployment)
        self.config = config.only_experts(spec.experts)
        self.experts = list(spec.experts)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        prepared = [e.model for e in self.config.experts if e.model and e.model.startswith("coe:")]
        ensure_models(prepared)
        self.pool = EnginePool(self.config)
        self._inflight = 0
        self._served = 0
        await self.pool.start(self.experts)
        log.info("replica %s of %s serves %s", self.replica_id, deployment, self.experts)

    async def generate(
        self,
        expert: str,
        prompt: dict[str, Any],
        sampling: dict[str, Any],
        request_id: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The expert's token stream as plain dicts (``Chunk`` fields). ``expert`` is a keyword
        the request router reads to pick this replica."""
        if expert not in self.experts:
            raise EngineError(f"expert {expert} is not served by this deployment", retryable=False)
        engine = self.pool.engine_for(expert)
        self._inflight += 1
        try:
            async for chunk in engine.stream(
                prompt_from_wire(prompt), sampling_from_wire(sampling), request_id
            ):
                yield chunk_to_wire(chunk)
        finally:
            self._inflight -= 1
            self._served += 1

    async def prefetch(self, expert: str) -> None:
        """A gateway routed a request for ``expert`` here: start moving its weights up."""
        if expert in self.experts:
            self.pool.prefetch(expert)

    async def health(self) -> dict[str, dict[str, str]]:
        """Per expert: its engine's state here ("up", "down", "starting") and why."""
        states = await self.pool.health()
        return {name: {"state": h.state, "reason": h.reason} for name, h in states.items()}

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this (cluster.stats_period_s) and passes it to the request router: where
        each expert's weights are (an expert outside the weight cache is resident while its
        engine runs), the queue, the cache's slots and the experts that go through them."""
        rows = self.pool.cache_status()  # read once: it walks every cached checkpoint
        tiers = {
            expert: (Tier.HBM if self.pool.engine_for(expert).ready else Tier.DISK)
            for expert in self.experts
        }
        swappable: list[str] = []
        for row in rows:
            for expert in row["experts"]:  # type: ignore[attr-defined]
                tiers[expert] = Tier(str(row["tier"]))
                swappable.append(expert)
        return {
            "tiers": {name: tier.value for name, tier in tiers.items()},
            "queue": self._inflight,
            "slots": sum(len(g.slots) for g in self.pool.groups.values()),
            "swappable": swappable,
            "at": time.time(),
        }

    async def stats(self) -> dict[str, Any]:
        """For tests and `coe experts`: where this replica is, what it holds, what it served."""
        import ray

        return {
            "replica": self.replica_id,
            "node_ip": ray.util.get_node_ip_address(),
            "served": self._served,
            "cache": self.pool.cache_status(),
            **(await self.record_routing_stats()),
        }

    async def __del__(self) -> None:
        await self.pool.shutdown()


def chunk_to_wire(chunk: Chunk) -> dict[str, Any]:
    return asdict(chunk)


def chunk_from_wire(data: dict[str, Any]) -> Chunk:
    usage = data.get("usage")
    logprobs = data.get("logprobs")
    return Chunk(
        text=data["text"],
        finish_reason=data.get("finish_reason"),
        usage=Usage(**usage) if usage is not None else None,
        tool_calls=[ToolCallDelta(**d) for d in data.get("tool_calls", ())],
        logprobs=None
        if logprobs is None
        else [
            TokenLogprob(lp["token"], lp["logprob"], [(t, v) for t, v in lp["top"]])
            for lp in logprobs
        ],
    )
