"""`coe bench gateway`: what the HTTP gateway adds on top of the engine, measured in one run.

The same request (same expert, prompt and sampling) goes straight to the engine and through the
gateway over loopback HTTP, interleaved so that both see the same machine state. Both start from
the same (main) thread: the direct call hops to the engine's event loop, the gateway call goes
through a keep-alive HTTP connection. The response cache is skipped for these requests
(x-coe-cache-control: no-cache); its hits are timed separately.

The gateway is timed with the request log on and off, interleaved too: what logging adds is
the difference of the two overheads' medians. The log written is a temporary file (the prompt
policy of experts.yaml), not the user's: a benchmark's hundreds of requests stay out of
`coe logs`.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from coe.bench.report import percentile_ms, print_table
from coe.gateway.server import GatewayServer
from coe.orchestrator import Orchestrator
from coe.requestlog import LogWriter, RequestLog
from coe.runtime import BackgroundLoop
from coe.types import Message, collect

PROMPT = "Name the largest planet in the solar system."
CONCURRENCY = 16
TARGET_OVERHEAD_P50_MS = 3.0
TARGET_CACHE_HIT_P50_MS = 2.0
TARGET_LOG_OVERHEAD_P50_MS = 0.2


@dataclass
class GatewayBench:
    expert: str
    store: str
    requests: int
    tokens: int
    direct_p50_ms: float
    direct_p99_ms: float
    gateway_p50_ms: float
    gateway_p99_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    # The same, with the request log off; and what logging adds (difference of the p50s).
    unlogged_p50_ms: float
    unlogged_overhead_p50_ms: float
    unlogged_overhead_p99_ms: float
    log_overhead_p50_ms: float
    log_written: int  # records the log writer wrote during the run (all of them, or it says)
    log_dropped: int
    auto_requests: int
    auto_p50_ms: float
    cache_hits: int  # repeats measured, each answered from the response cache (else an error)
    cache_hit_p50_ms: float
    cache_hit_p99_ms: float
    direct_requests_s: float
    gateway_requests_s: float
    concurrency: int
    target_overhead_p50_ms: float = TARGET_OVERHEAD_P50_MS
    target_cache_hit_p50_ms: float = TARGET_CACHE_HIT_P50_MS
    target_log_overhead_p50_ms: float = TARGET_LOG_OVERHEAD_P50_MS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def print_table(self) -> None:
        print_table(
            f"gateway benchmark: expert {self.expert}, {self.tokens} token(s), "
            f"{self.requests} requests per measurement, {self.store} store",
            ("measure", "p50 ms", "p99 ms", "note"),
            [
                ("straight to the engine", f"{self.direct_p50_ms}", f"{self.direct_p99_ms}",
                 "reference"),
                ("through the gateway", f"{self.gateway_p50_ms}", f"{self.gateway_p99_ms}",
                 f"model {self.expert}, non-streaming, request log on"),
                ("gateway overhead", f"{self.overhead_p50_ms}", f"{self.overhead_p99_ms}",
                 f"target p50 <= {self.target_overhead_p50_ms} ms"),
                ("gateway overhead, request log off", f"{self.unlogged_overhead_p50_ms}",
                 f"{self.unlogged_overhead_p99_ms}", "reference for the log"),
                ("request log adds", f"{self.log_overhead_p50_ms}", "",
                 f"target p50 <= {self.target_log_overhead_p50_ms} ms; {self.log_written} "
                 f"records written, {self.log_dropped} dropped"),
                ("through the gateway, model auto", f"{self.auto_p50_ms}", "", "adds routing"),
                ("response-cache hit", f"{self.cache_hit_p50_ms}", f"{self.cache_hit_p99_ms}",
                 f"target p50 <= {self.target_cache_hit_p50_ms} ms"),
            ],
        )  # fmt: skip
        print(
            f"throughput at {self.concurrency} concurrent requests: gateway "
            f"{self.gateway_requests_s} req/s, "
            f"straight to the engine {self.direct_requests_s} req/s"
        )


def run_gateway_bench(
    orch: Orchestrator,
    runner: BackgroundLoop,
    expert: str,
    requests: int,
    tokens: int,
    max_seconds: float,
) -> GatewayBench:
    """Through a gateway on ``orch`` (and its store: open it on Redis to measure with one)."""
    configured = orch.requests
    server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
    server.start()
    with tempfile.TemporaryDirectory(prefix="coe-bench-log-") as work:
        writer = LogWriter(Path(work) / "requests.sqlite", prompts=orch.config.log.prompts)
        logged = RequestLog(writer, front_end="gateway", pool="coe bench gateway")
        try:
            result = _measure(orch, runner, server, expert, requests, tokens, max_seconds, logged)
        finally:
            server.stop()
            orch.requests = configured
            logged.close()
    result.log_written, result.log_dropped = writer.written, writer.dropped
    return result


def _measure(
    orch: Orchestrator,
    runner: BackgroundLoop,
    server: GatewayServer,
    expert: str,
    requests: int,
    tokens: int,
    max_seconds: float,
    logged: RequestLog,
) -> GatewayBench:
    chosen = orch.config.expert(expert)
    unlogged = RequestLog.off("gateway")
    orch.requests = logged  # the default: every phase but the unlogged one logs
    prompt = orch.build_prompt(chosen, [Message("user", PROMPT)])
    params = orch.sampling_for(chosen, max_tokens=tokens, temperature=0.0)
    engine = orch.engines.engine_for(expert)
    body = {
        "model": expert,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    no_cache = {"x-coe-cache-control": "no-cache"}
    budget = max_seconds / 4  # four timed phases share the time bound

    def direct() -> None:
        runner.run(collect(engine.stream(prompt, params)))

    with httpx.Client(base_url=server.url, timeout=60) as http:

        def through(model: str = expert, headers: dict[str, str] | None = no_cache) -> None:
            r = http.post("/v1/chat/completions", json={**body, "model": model}, headers=headers)
            r.raise_for_status()

        def through_unlogged() -> None:
            # Requests are sequential: switching the log between them is safe.
            orch.requests = unlogged
            try:
                through()
            finally:
                orch.requests = logged

        for _ in range(5):  # warm every path (connections, first-request allocations)
            direct()
            through()
            through_unlogged()
        direct_s, gateway_s, unlogged_s = [], [], []
        t_end = time.monotonic() + budget
        for i in range(requests):
            # The logged and unlogged calls take turns right after the direct one: the first
            # request after an engine call pays for the engine winding down, and that must
            # not count as the log's.
            gateway = [(through, gateway_s), (through_unlogged, unlogged_s)]
            for fn, out in [(direct, direct_s), *(gateway if i % 2 == 0 else gateway[::-1])]:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            if time.monotonic() > t_end:
                break
        auto_s = []
        t_end = time.monotonic() + budget
        for _ in range(min(requests, 50)):
            t0 = time.perf_counter()
            through("auto")
            auto_s.append(time.perf_counter() - t0)
            if time.monotonic() > t_end:
                break
        through(headers={})  # a miss that fills the cache
        hits = []
        t_end = time.monotonic() + budget
        for _ in range(requests):
            t0 = time.perf_counter()
            r = http.post("/v1/chat/completions", json=body)
            hits.append(time.perf_counter() - t0)
            if r.headers.get("x-coe-cache") != "hit":
                raise RuntimeError("the repeated request was not answered from the cache")
            if time.monotonic() > t_end:
                break

    direct_rps = runner.run(_direct_rate(engine, prompt, params, requests, budget))
    # The HTTP clients run on a loop of their own (this thread), not on the server's loop.
    gateway_rps = asyncio.run(_gateway_rate(server.url, body, no_cache, requests, budget))
    overhead = [g - d for g, d in zip(gateway_s, direct_s, strict=True)]
    unlogged_overhead = [u - d for u, d in zip(unlogged_s, direct_s, strict=True)]
    overhead_p50 = 1000 * statistics.median(overhead)
    unlogged_p50 = 1000 * statistics.median(unlogged_overhead)
    return GatewayBench(
        expert=expert,
        store=server.store.kind,
        requests=len(gateway_s),
        tokens=tokens,
        direct_p50_ms=percentile_ms(direct_s, 0.5),
        direct_p99_ms=percentile_ms(direct_s, 0.99),
        gateway_p50_ms=percentile_ms(gateway_s, 0.5),
        gateway_p99_ms=percentile_ms(gateway_s, 0.99),
        overhead_p50_ms=round(overhead_p50, 3),
        overhead_p99_ms=percentile_ms(overhead, 0.99),
        unlogged_p50_ms=percentile_ms(unlogged_s, 0.5),
        unlogged_overhead_p50_ms=round(unlogged_p50, 3),
        unlogged_overhead_p99_ms=percentile_ms(unlogged_overhead, 0.99),
        log_overhead_p50_ms=round(overhead_p50 - unlogged_p50, 3),
        log_written=0,  # filled in once the writer has written everything
        log_dropped=0,
        auto_requests=len(auto_s),
        auto_p50_ms=percentile_ms(auto_s, 0.5),
        cache_hits=len(hits),
        cache_hit_p50_ms=percentile_ms(hits, 0.5),
        cache_hit_p99_ms=percentile_ms(hits, 0.99),
        direct_requests_s=direct_rps,
        gateway_requests_s=gateway_rps,
        concurrency=CONCURRENCY,
    )


async def _direct_rate(engine: Any, prompt: Any, params: Any, count: int, budget: float) -> float:
    async def one() -> None:
        await collect(engine.stream(prompt, params))

    return await _rate(one, count, budget)


async def _gateway_rate(
    url: str, body: dict[str, Any], headers: dict[str, str], count: int, budget: float
) -> float:
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def one() -> None:
            r = await http.post("/v1/chat/completions", json=body, headers=headers)
            r.raise_for_status()

        return await _rate(one, count, budget)


async def _rate(one: Any, count: int, budget: float) -> float:
    """Requests per second with CONCURRENCY in flight, over ``count`` requests or ``budget`` s."""
    done = 0
    t_end = time.monotonic() + budget

    async def worker() -> None:
        nonlocal done
        while done < count and time.monotonic() < t_end:
            done += 1
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return round(done / (time.perf_counter() - t0), 1)
