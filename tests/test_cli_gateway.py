"""`coe keys new`, `coe serve` and `coe bench gateway` as a user runs them: real `coe serve`
processes on a real Redis, their expert a small OpenAI-compatible server in the test (the
gateway and the store are the point here, not the model)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import yaml

from coe.gateway.auth import hash_key

from .conftest import COE, RedisProcess, cli_env, coe, free_port, wait_for_health

BURST_KEY = "coe-burst-key-for-two-gateways"
TOKENS_KEY = "coe-tokens-key-for-two-gateways"
BURST_LIMIT = 4  # requests per minute: one back every 15 s, far longer than the burst takes
TOKEN_LIMIT = 40  # tokens per minute; each answer of the fake server uses 50


def test_keys_new_prints_the_key_once_and_only_its_hash_for_the_config() -> None:
    run = coe("keys", "new", "--name", "alice", timeout=60)
    assert run.returncode == 0, run.stderr
    key = re.search(r"(coe-\S+)", run.stderr)
    assert key is not None
    (entry,) = yaml.safe_load(run.stdout)
    assert entry == {"name": "alice", "sha256": hash_key(key.group(1))}
    assert key.group(1) not in run.stdout


@pytest.mark.engine
def test_bench_gateway_json_reports_overhead_beside_the_engine(
    test_pool_file: Path, redis_up: RedisProcess
) -> None:
    run = coe(
        "--config", str(test_pool_file), "bench", "gateway", "--json",
        "--requests", "20", "--max-seconds", "40", "--redis-url", redis_up.url,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["store"] == "redis" and out["requests"] >= 1
    for key in ("direct_p50_ms", "gateway_p50_ms", "cache_hit_p50_ms", "auto_p50_ms"):
        assert out[key] > 0, key
    # The gateway does more than the engine alone: its latency is not below the engine's.
    assert out["gateway_p50_ms"] >= out["direct_p50_ms"] - 5
    assert out["gateway_requests_s"] > 0 and out["direct_requests_s"] > 0
    assert out["target_overhead_p50_ms"] == 3.0


# -- coe serve on a real Redis ----------------------------------------------------------------


class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible expert that answers "ok" at once, reporting 20 prompt and 30
    completion tokens, streamed or not."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        usage = {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}
        base = {"id": "x", "created": 0, "model": "fake"}
        if not request.get("stream"):
            message = {"role": "assistant", "content": "ok"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            self._json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ]
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def fake_expert() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def remote_pool_file(folder: Path, expert_url: str) -> Path:
    """A pool whose one expert is the fake server, with a request-limited and a token-limited
    key."""
    path = folder / "experts.yaml"
    data = {
        "experts": [
            {
                "name": "fake",
                "engine": "remote",
                "remote": {"base_url": expert_url, "model": "fake"},
            }
        ],
        "categories": [{"name": "general", "expert": "fake"}],
        "gateway": {
            "api_keys": [
                {
                    "name": "burst",
                    "sha256": hash_key(BURST_KEY),
                    "limits": {"requests_per_minute": BURST_LIMIT},
                },
                {
                    "name": "tokens",
                    "sha256": hash_key(TOKENS_KEY),
                    "limits": {"tokens_per_minute": TOKEN_LIMIT},
                },
            ],
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def serve(config: Path, redis_url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [COE, "--config", str(config), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--redis-url", redis_url]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env())
    return proc, f"http://127.0.0.1:{port}"


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (a clean shutdown) to all at once, SIGKILL to any still running after 30 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_refuses_a_wrong_redis_password_with_exit_2(
    own_redis: RedisProcess, fake_expert: str, tmp_path: Path
) -> None:
    own_redis.stop()
    own_redis.start(password="the-right-one")
    config = remote_pool_file(tmp_path, fake_expert)
    run = coe(
        "--config", str(config), "serve", "--host", "127.0.0.1", "--port", str(free_port()),
        "--redis-url", own_redis.url_with("a-wrong-secret"), timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "misconfigured" in run.stderr and "user or password" in run.stderr, run.stderr
    assert f"redis://:***@127.0.0.1:{own_redis.port}/0" in run.stderr
    assert "a-wrong-secret" not in run.stderr + run.stdout


@pytest.fixture(scope="module")
def two_gateways(
    redis_server: RedisProcess, fake_expert: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    """Two `coe serve` processes on one Redis (the session's, flushed first)."""
    if redis_server.proc is None or redis_server.paused or redis_server.password is not None:
        redis_server.stop()
        redis_server.start()
    subprocess.run(["redis-cli", "-p", str(redis_server.port), "flushall"], check=True,
                   capture_output=True)  # fmt: skip
    folder = tmp_path_factory.mktemp("two-gateways")
    config = remote_pool_file(folder, fake_expert)
    started = [serve(config, redis_server.url, folder / f"serve-{i}.log") for i in range(2)]
    try:
        for i, (proc, base) in enumerate(started):
            wait_for_health(proc, base, folder / f"serve-{i}.log", f"coe serve #{i}", 120)
        yield [base for _, base in started]
    finally:
        stop([proc for proc, _ in started])


def test_two_gateways_on_one_redis_admit_exactly_the_limit(two_gateways: list[str]) -> None:
    """16 concurrent requests of one key, alternating between the two processes: the limit is
    one bucket in Redis, so exactly BURST_LIMIT are answered and the rest get 429."""

    async def burst() -> list[int | str]:
        clients = [
            openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=BURST_KEY, max_retries=0)
            for base in two_gateways
        ]

        async def one(i: int) -> int | str:
            try:
                await clients[i % 2].chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": f"hi {i}"}]
                )
                return 200
            except openai.RateLimitError as exc:
                return exc.response.headers["retry-after"]

        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            for client in clients:
                await client.close()

    t0 = time.monotonic()
    results = asyncio.run(burst())
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"the burst took {elapsed:.1f} s: a request came back into the bucket"
    assert results.count(200) == BURST_LIMIT, results
    refused = [r for r in results if r != 200]
    assert len(refused) == 16 - BURST_LIMIT
    # Four a minute come back one every 15 s.
    assert all(1 <= int(r) <= 15 for r in refused), refused


def test_a_token_limit_is_shared_by_both_gateways(two_gateways: list[str]) -> None:
    """An answer that used 50 tokens through one gateway spends the key's 40 a minute: the next
    request, through the other gateway, gets 429 for tokens."""
    first, second = (
        openai.OpenAI(base_url=f"{base}/v1", api_key=TOKENS_KEY, max_retries=0)
        for base in two_gateways
    )
    ask = [{"role": "user", "content": "a"}]
    reply = first.chat.completions.create(model="fake", messages=ask)
    assert reply.usage is not None and reply.usage.total_tokens == 50
    deadline = time.monotonic() + 5
    while True:  # the usage is charged just after the answer is sent
        try:
            second.chat.completions.create(model="fake", messages=ask)
        except openai.RateLimitError as exc:
            refused = exc
            break
        assert time.monotonic() < deadline, "the second gateway never saw the tokens spent"
        time.sleep(0.2)
    assert "tokens per minute" in refused.message
    # 11 tokens short at 40 a minute: 16.5 s.
    assert 15 <= int(refused.response.headers["retry-after"]) <= 18
