"""Fault injection against the live stack: a real `coe serve` (an in-process vLLM engine and a
weight-cache slot engine), a real `vllm serve` remote expert and a real Redis, under 16
concurrent streams, while each part in turn is SIGKILLed, hung (SIGSTOP) or misconfigured.

For every fault: each request ends (an answer, an OpenAI-shaped error, or a final SSE error event)
within its deadline; /health goes to the fault and back; no engine is left holding requests; the
next requests succeed once the part is back. Each fault's figures (requests sent, answered, failed
cleanly, hung, time to detect, time to recover) are printed and, with $COE_FAULTS_REPORT set,
written there as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from coe.gateway.auth import hash_key
from coe.models.variants import prepared_variant

from .conftest import (
    COE,
    RedisProcess,
    VllmServe,
    cli_env,
    free_port,
    stop_processes,
    wait_for_health,
)

pytestmark = [pytest.mark.engine, pytest.mark.faults]

KEY = "coe-fault-suite-key-" + "k" * 32
STREAMS = 16
# Every request reaches an engine: greedy answers would otherwise come from the response cache.
NO_CACHE = {"x-coe-cache-control": "no-cache"}
MAX_TOKENS = 8
# Each client waits this long between its requests: on 2 cores a storm without pauses starves
# the engine restart it is waiting for (it took three minutes instead of one).
THINK_S = 2.0
GIB = 1 << 30
# Deadlines of every expert (experts.yaml `deadlines:`). A request tries its expert and then one
# fallback, so it ends within first_token_s + total_s (+ the store's 0.5 s), or it hung.
FIRST_TOKEN_S, TOTAL_S, QUEUE_S = 20.0, 60.0, 20.0
HUNG_AFTER_S = 2 * FIRST_TOKEN_S + TOTAL_S + 10
RECOVER_WITHIN_S = 300.0
REPORT: list[FaultFigures] = []


@dataclass
class FaultFigures:
    fault: str
    sent: int = 0
    answered: int = 0
    failed_cleanly: int = 0
    hung: int = 0
    unclean: list[str] = field(default_factory=list)
    detect_s: float | None = None
    recover_s: float | None = None
    longest_request_s: float = 0.0


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    serve: subprocess.Popen[bytes]
    base: str
    log: Path
    remote: VllmServe
    redis: RedisProcess

    def health(self) -> dict:
        # Generous: on 2 cores under the storm and an engine restart, the gateway is slow too.
        return httpx.get(f"{self.base}/health", timeout=30).json()

    def metrics(self) -> str:
        headers = {"authorization": f"Bearer {KEY}"}
        return httpx.get(f"{self.base}/metrics", headers=headers, timeout=30).text

    def engine_process(self, title: Callable[[str], bool]) -> psutil.Process:
        """The engine process of `coe serve` whose title (``coe-NAME::EngineCore``) matches."""
        found = []
        for process in psutil.Process(self.serve.pid).children(recursive=True):
            try:
                name = " ".join(process.cmdline())
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue  # an engine killed earlier, not yet reaped
            if title(name):
                found.append(process)
        assert len(found) == 1, [" ".join(p.cmdline()) for p in found]
        return found[0]


def pool_file(folder: Path, model_dir: Path, remote: VllmServe) -> Path:
    engine = {"prompt_format": "qa", "vllm": {"cpu_kv_cache_gib": 1, "max_num_seqs": 16}}
    data = {
        "experts": [
            # Its own max_model_len keeps it out of the variants' slot group: a plain engine.
            {"name": "local", "model": str(model_dir), "max_model_len": 1000, **engine},
            {
                "name": "far",
                "engine": "remote",
                "remote": {"base_url": f"{remote.base}/v1", "model": "gemma-remote"},
            },
            # Two checkpoints, one slot: a weight-cache group that swaps.
            {"name": "v1", "model": str(prepared_variant(1)), "max_model_len": 1024, **engine},
            {"name": "v2", "model": str(prepared_variant(2)), "max_model_len": 1024, **engine},
        ],
        "categories": [
            {"name": "general", "expert": "local", "fallbacks": ["far"]},
            {"name": "remote", "expert": "far", "fallbacks": ["local"]},
            {"name": "swapped", "expert": "v1", "fallbacks": ["local"]},
            {"name": "other", "expert": "v2", "fallbacks": ["local"]},
        ],
        "router": {"fallback": "general"},
        # One slot per group: the local engine's and one for v1/v2.
        "cache": {"hbm_bytes": int(3.4 * GIB), "host_bytes": int(2.6 * GIB), "max_wait_s": 1.0},
        "deadlines": {"first_token_s": FIRST_TOKEN_S, "total_s": TOTAL_S, "queue_s": QUEUE_S},
        "gateway": {
            "api_keys": [
                {
                    "name": "suite",
                    "sha256": hash_key(KEY),
                    # Limits make every request need the store (admission in Redis).
                    "limits": {"requests_per_minute": 100_000},
                }
            ]
        },
    }
    path = folder / "experts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("faults")
    redis = RedisProcess(folder)
    redis.start()
    remote = VllmServe(model_dir, folder / "vllm-serve.log", "--max-num-seqs", "16")
    remote.start()
    port = free_port()
    log = folder / "coe-serve.log"
    cmd = [
        COE, "--config", str(pool_file(folder, model_dir, remote)), "serve",
        "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis.url,
    ]  # fmt: skip
    with log.open("w") as out:
        serve = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env())
    base = f"http://127.0.0.1:{port}"
    try:
        remote.wait_ready()
        wait_for_health(serve, base, log, "coe serve")
        built = Stack(serve, base, log, remote, redis)
        wait_until(lambda: all_up(built.health()), 120, "the stack to be up")
        yield built
    finally:
        stop_processes(serve)
        remote.stop()
        redis.stop()
        print_report()


def all_up(health: dict) -> bool:
    experts = health["experts"].values()
    return all(e["state"] == "up" for e in experts) and health["store"]["healthy"]


def wait_until(check: Callable[[], bool], within_s: float, what: str) -> float:
    """Poll ``check`` every 0.1 s; the seconds it took, or fail."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > within_s:
            pytest.fail(f"waited {within_s:.0f} s for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def print_report() -> None:
    if not REPORT:
        return
    lines = ["fault | sent | answered | failed cleanly | hung | detect s | recover s"]
    for f in REPORT:
        lines.append(
            f"{f.fault} | {f.sent} | {f.answered} | {f.failed_cleanly} | {f.hung} | "
            f"{f.detect_s} | {f.recover_s}"
        )
    print("\n" + "\n".join(lines))
    if path := os.environ.get("COE_FAULTS_REPORT"):
        Path(path).write_text(json.dumps([asdict(f) for f in REPORT], indent=2))


# -- the storm ---------------------------------------------------------------------------------


async def one_request(client: openai.AsyncOpenAI, model: str, figures: FaultFigures) -> None:
    """One streamed request; counted as answered, failed cleanly, hung or unclean."""
    figures.sent += 1
    t0 = time.monotonic()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Name a planet of the solar system."}],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            stream=True,
            extra_headers=NO_CACHE,
        )
        finished = False
        async for chunk in stream:
            finished = finished or any(c.finish_reason for c in chunk.choices)
        if finished:
            figures.answered += 1
        else:
            figures.unclean.append("a stream ended without a finish_reason or an error")
    except openai.APITimeoutError:
        figures.hung += 1
    except openai.APIStatusError as exc:  # an error answer before the stream began
        body = exc.body if isinstance(exc.body, dict) else {}
        if exc.status_code in (429, 500, 503, 504) and body.get("message"):
            figures.failed_cleanly += 1
        else:
            figures.unclean.append(f"{exc.status_code}: {exc.body!r}")
    except openai.APIError as exc:  # the final SSE error event, after the stream began
        if getattr(exc, "body", None) is not None or exc.message:
            figures.failed_cleanly += 1
        else:
            figures.unclean.append(repr(exc))
    except Exception as exc:  # a dropped connection, a broken stream: not a clean end
        figures.unclean.append(repr(exc))
    figures.longest_request_s = max(figures.longest_request_s, time.monotonic() - t0)


@contextlib.asynccontextmanager
async def storm(stack: Stack, model: str, figures: FaultFigures) -> AsyncIterator[None]:
    """STREAMS clients sending request after request to ``model`` until the block ends."""
    client = openai.AsyncOpenAI(
        base_url=f"{stack.base}/v1", api_key=KEY, max_retries=0, timeout=HUNG_AFTER_S
    )
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            await one_request(client, model, figures)
            await asyncio.sleep(THINK_S)

    workers = [asyncio.create_task(worker()) for _ in range(STREAMS)]
    try:
        await asyncio.sleep(3)  # requests in flight when the fault comes
        yield
        await asyncio.sleep(3)  # and after the part is back
    finally:
        stop.set()
        # Every request ends on its own (answer, error, or the client's hang timeout).
        await asyncio.gather(*workers)
        await client.close()


async def poll(check: Callable[[], bool], within_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - t0 > within_s:
            pytest.fail(f"waited {within_s:.0f} s for {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


def expert_state(stack: Stack, expert: str) -> str:
    return str(stack.health()["experts"][expert]["state"])


def engines_idle(stack: Stack) -> bool:
    """No in-process engine and no remote server holds an unfinished request."""
    held = re.findall(r"^coe_engine_unfinished_requests\{.*\} (\S+)$", stack.metrics(), re.M)
    remote = httpx.get(f"{stack.remote.base}/metrics", timeout=10).text
    running = re.findall(r"^vllm:num_requests_running\{.*\} (\S+)$", remote, re.M)
    return bool(held) and all(float(v) == 0 for v in held + running)


def check_the_aftermath(stack: Stack, figures: FaultFigures, model: str, expert: str) -> None:
    REPORT.append(figures)
    assert figures.hung == 0, figures
    assert figures.unclean == [], figures
    assert figures.sent == figures.answered + figures.failed_cleanly
    assert figures.longest_request_s < HUNG_AFTER_S
    wait_until(lambda: engines_idle(stack), 30, "every engine to hold no unfinished request")
    # The part is back: the next requests are answered by the expert itself, not a stand-in.
    client = openai.OpenAI(base_url=f"{stack.base}/v1", api_key=KEY, max_retries=0, timeout=120)
    for _ in range(3):
        done = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=4,
            temperature=0.0,
            extra_headers=NO_CACHE,
        )
        assert done.model == expert and done.choices[0].finish_reason is not None


# -- the faults ----------------------------------------------------------------------------------


async def kill_an_engine(
    stack: Stack, fault: str, model: str, expert: str, kill: Callable[[], None]
) -> FaultFigures:
    figures = FaultFigures(fault)
    async with storm(stack, model, figures):
        kill()
        t0 = time.monotonic()
        figures.detect_s = round(
            await poll(lambda: expert_state(stack, expert) != "up", 30, f"{expert} down"), 2
        )
        await poll(lambda: expert_state(stack, expert) == "up", RECOVER_WITHIN_S, f"{expert} up")
        figures.recover_s = round(time.monotonic() - t0, 1)
    return figures


async def test_the_in_process_engine_killed(stack: Stack) -> None:
    engine = stack.engine_process(lambda title: title.startswith("coe-local::EngineCore"))
    figures = await kill_an_engine(stack, "SIGKILL in-process engine", "auto:general", "local",
                                   engine.kill)  # fmt: skip
    check_the_aftermath(stack, figures, "auto:general", "local")
    assert figures.answered > 0  # the fallback expert answered while it was down


async def test_the_slot_engine_killed(stack: Stack) -> None:
    engine = stack.engine_process(lambda title: "#0::EngineCore" in title)
    figures = await kill_an_engine(stack, "SIGKILL weight-cache slot engine", "auto:swapped", "v1",
                                   engine.kill)  # fmt: skip
    check_the_aftermath(stack, figures, "auto:swapped", "v1")


async def test_the_remote_server_killed(stack: Stack) -> None:
    def kill_and_restart() -> None:
        stack.remote.kill()
        stack.remote.start()  # on the same port; it takes its time to load

    figures = await kill_an_engine(stack, "SIGKILL remote vllm serve", "auto:remote", "far",
                                   kill_and_restart)  # fmt: skip
    check_the_aftermath(stack, figures, "auto:remote", "far")


async def test_redis_hung(stack: Stack) -> None:
    figures = FaultFigures("SIGSTOP Redis (a hang)")
    async with storm(stack, "auto:general", figures):
        stack.redis.pause()
        t0 = time.monotonic()
        try:
            down = await poll(lambda: not stack.health()["store"]["healthy"], 30, "store down")
            figures.detect_s = round(down, 2)
            await asyncio.sleep(3)  # requests meet the hung store
        finally:
            stack.redis.resume()
        await poll(lambda: stack.health()["store"]["healthy"], 30, "store back")
        figures.recover_s = round(time.monotonic() - t0, 1)
    check_the_aftermath(stack, figures, "auto:general", "local")
    assert figures.failed_cleanly > 0  # fail-closed: limited requests were refused, not let in


async def test_redis_restarted_with_a_password(stack: Stack) -> None:
    figures = FaultFigures("Redis restarted with a password")
    async with storm(stack, "auto:general", figures):
        stack.redis.stop()
        stack.redis.start(password="a-password-coe-does-not-know")
        t0 = time.monotonic()
        try:
            bad = await poll(
                lambda: stack.health()["store"]["state"] == "misconfigured", 30, "misconfigured"
            )
            figures.detect_s = round(bad, 2)
            assert stack.health()["status"] == "unavailable"
            await asyncio.sleep(3)  # requests meet the misconfigured store
        finally:
            stack.redis.stop()
            stack.redis.start()
        await poll(lambda: stack.health()["store"]["state"] == "ok", 30, "store ok")
        figures.recover_s = round(time.monotonic() - t0, 1)
    check_the_aftermath(stack, figures, "auto:general", "local")
    assert figures.failed_cleanly > 0  # 503 store_misconfigured, not silently admitted
