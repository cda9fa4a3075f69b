"""`coe keys new`, `coe serve`'s refusals and output, and `coe bench gateway` as a user runs
them: real `coe serve` processes on a real Redis (their expert a small OpenAI-compatible server in
the test: the gateway and the store are the point there, not the model); and a remote expert
behind a `vllm serve` that requires a key, as docker-compose.yml runs it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from coe.config import RateLimits
from coe.gateway.auth import API_KEYS_ENV, MIN_KEY_LENGTH, KeyRing, hash_key, new_key
from coe.gateway.server import OpenGatewayError, check_exposure

from .conftest import (
    COE,
    RedisProcess,
    VllmServe,
    cli_env,
    coe,
    free_port,
    stop_processes,
    wait_for_health,
)

BURST_KEY = "coe-burst-key-for-two-gateways"
TOKENS_KEY = "coe-tokens-key-for-two-gateways"
BURST_LIMIT = 4  # requests per minute: one back every 15 s, far longer than the burst takes
TOKEN_LIMIT = 40  # tokens per minute; each answer of the fake server uses 50


LONG_KEY = new_key()


def remote_pool(tmp_path: Path, **remote: str) -> Path:
    """A pool of one remote expert: `coe serve` starts it without loading any model."""
    base = {"base_url": "http://127.0.0.1:9/v1", "model": "far", **remote}
    data = {
        "experts": [{"name": "far", "engine": "remote", "remote": base}],
        "categories": [{"name": "general", "expert": "far"}],
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def serve_env(**extra: str) -> dict[str, str]:
    env = cli_env(**extra)
    if API_KEYS_ENV not in extra:
        env.pop(API_KEYS_ENV, None)
    return env


def run_serve(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COE, "--config", str(config), "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=serve_env(**env),
    )


def test_keys_new_prints_the_key_once_and_only_its_hash_for_the_config() -> None:
    run = coe("keys", "new", "--name", "alice", timeout=60)
    assert run.returncode == 0, run.stderr
    key = re.search(r"(coe-\S+)", run.stderr)
    assert key is not None
    (entry,) = yaml.safe_load(run.stdout)
    assert entry == {"name": "alice", "sha256": hash_key(key.group(1))}
    assert key.group(1) not in run.stdout
    # Long enough for $COE_API_KEYS: `coe keys new` makes keys the gateway accepts there.
    assert len(key.group(1)) >= MIN_KEY_LENGTH
    assert KeyRing.from_settings([], RateLimits(), key.group(1)).required


# -- coe serve: refusals before anything starts ------------------------------------------------


def test_serve_refuses_to_start_open_on_a_non_loopback_address(tmp_path: Path) -> None:
    # Refused before the pool opens or a socket is bound: nothing listens on 0.0.0.0 here.
    started = time.monotonic()
    run = run_serve(remote_pool(tmp_path), "--host", "0.0.0.0", "--port", str(free_port()))
    assert run.returncode == 2, run.stderr
    assert "without API keys" in run.stderr and "--allow-open" in run.stderr
    assert "coe serve:" not in run.stderr and "starting the expert engine" not in run.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("host", "keys", "allow_open", "refused"),
    [
        ("0.0.0.0", False, False, True),
        ("::", False, False, True),
        ("192.168.1.10", False, False, True),
        ("gateway.internal", False, False, True),
        ("0.0.0.0", False, True, False),
        ("0.0.0.0", True, False, False),
        ("127.0.0.1", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
    ],
)
def test_an_open_gateway_beyond_loopback_needs_allow_open(
    host: str, keys: bool, allow_open: bool, refused: bool
) -> None:
    if refused:
        with pytest.raises(OpenGatewayError, match="--allow-open"):
            check_exposure(host, keys, allow_open)
    else:
        check_exposure(host, keys, allow_open)


def test_a_short_key_in_the_environment_is_refused_without_showing_it(tmp_path: Path) -> None:
    short = "coe-short-" + "x" * (MIN_KEY_LENGTH - 11)
    run = run_serve(
        remote_pool(tmp_path), "--port", str(free_port()), COE_API_KEYS=f"{LONG_KEY}, {short}"
    )
    assert run.returncode == 2, run.stderr
    assert f"${API_KEYS_ENV}" in run.stderr and "key 2 of 2" in run.stderr
    assert f"at least {MIN_KEY_LENGTH}" in run.stderr
    assert short not in run.stderr and LONG_KEY not in run.stderr
    assert "coe serve:" not in run.stderr


# -- coe serve: no password in what it prints ---------------------------------------------------


def redis_with_password(workdir: Path, password: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: `make test` installs it (see Makefile)")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
           "no", "--dir", str(workdir), "--requirepass", password]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT), port


def serve_until_listening(config: Path, *args: str, **env: str) -> tuple[str, str]:
    """Start `coe serve`, wait for its startup line, GET /health, stop it with SIGTERM; its
    output and the /health body."""
    port = free_port()
    cmd = [COE, "--config", str(config), "serve", "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=serve_env(**env)
    )
    try:
        wait_for_health_line = time.monotonic() + 120
        lines: list[str] = []
        assert proc.stdout is not None
        while time.monotonic() < wait_for_health_line:
            line = proc.stdout.readline()
            if not line:
                break  # it exited
            lines.append(line)
            if line.startswith("coe serve:"):
                break
        assert any(x.startswith("coe serve:") for x in lines), "".join(lines)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).text
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(lines) + rest
        return "".join(lines) + rest, health
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_never_prints_the_redis_password(tmp_path: Path) -> None:
    password = "Pw-only-the-operator-knows-42"
    redis, port = redis_with_password(tmp_path, password)
    config = remote_pool(tmp_path)
    try:
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        out, health = serve_until_listening(config, "--redis-url", url)
        assert f"Redis redis://:***@127.0.0.1:{port}/0" in out
        assert json.loads(health)["store"] == {
            "kind": "redis",
            "healthy": True,
            "state": "ok",
            "problem": None,
        }
        # Redis away: the warnings name the server, not its password.
        gone = f"redis://coe:{password}@127.0.0.1:{free_port()}/0"
        out_gone, _ = serve_until_listening(config, "--redis-url", gone)
        assert "not answering" in out_gone and "coe:***@127.0.0.1" in out_gone
        for text in (out, health, out_gone):
            assert password not in text
    finally:
        redis.kill()
        redis.wait(timeout=10)


@pytest.mark.engine
def test_bench_gateway_json_reports_overhead_beside_the_engine(
    test_pool_file: Path, redis_up: RedisProcess
) -> None:
    run = coe(
        "--config", str(test_pool_file), "bench", "gateway", "--json",
        "--requests", "20", "--tokens", "4", "--max-seconds", "60",
        "--redis-url", redis_up.url,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["store"] == "redis" and out["tokens"] == 4 and out["concurrency"] == 16
    # Every phase measured the requests asked for (each phase stops early only past 15 s); and
    # every repeat was a cache hit, or the bench would have failed.
    assert out["requests"] == out["auto_requests"] == out["cache_hits"] == 20, out
    for measure in ("direct", "gateway", "cache_hit", "overhead"):
        assert out[f"{measure}_p99_ms"] >= out[f"{measure}_p50_ms"], measure
    for key in ("direct_p50_ms", "gateway_p50_ms", "cache_hit_p50_ms", "auto_p50_ms"):
        assert out[key] > 0, key
    # A cache hit skips routing and generation: faster than any answer the engine generates.
    assert out["cache_hit_p50_ms"] < out["direct_p50_ms"], out
    assert out["cache_hit_p50_ms"] < out["gateway_p50_ms"], out
    assert out["gateway_requests_s"] > 0 and out["direct_requests_s"] > 0
    # The request log on (the default) and off, interleaved: both overheads, what logging
    # adds, and every record of the logged requests written (warm-up and timed ones at least).
    assert out["unlogged_overhead_p99_ms"] >= out["unlogged_overhead_p50_ms"]
    added = out["overhead_p50_ms"] - out["unlogged_overhead_p50_ms"]
    assert out["log_overhead_p50_ms"] == pytest.approx(added, abs=0.002)
    assert out["log_written"] >= 5 + 20 and out["log_dropped"] == 0, out


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
        stop_processes(*(proc for proc, _ in started), timeout_s=30)


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
    charged = time.monotonic()
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
    # 11 tokens short at 40 a minute: 16.5 s after the charge, less what has refilled since
    # (a loaded machine may take seconds between the two requests).
    since = time.monotonic() - charged
    assert 15 - since <= int(refused.response.headers["retry-after"]) <= 18


# -- a vLLM server that requires a key, as docker-compose.yml runs them -------------------------

VLLM_KEY_ENV = "COE_TEST_VLLM_KEY"


@pytest.fixture(scope="module")
def keyed_vllm(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve --api-key` without dev mode: the base URL (no /v1)."""
    log = tmp_path_factory.mktemp("vllm-keyed") / "server.log"
    server = VllmServe(model_dir, log, "--served-model-name", "keyed", "--api-key", LONG_KEY)
    server.start()
    try:
        # The healthcheck docker-compose.yml uses: /health, without the key.
        server.wait_ready()
        yield server.base
    finally:
        server.stop()


@pytest.mark.engine
def test_a_keyed_vllm_server_serves_coe_and_nobody_else(keyed_vllm: str, tmp_path: Path) -> None:
    auth = {"authorization": f"Bearer {LONG_KEY}"}
    # /v1 needs the key; /health does not; dev endpoints do not exist, with the key or without.
    assert httpx.get(keyed_vllm + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(keyed_vllm + "/v1/models", headers=auth, timeout=10).status_code == 200
    assert httpx.get(keyed_vllm + "/health", timeout=10).status_code == 200
    for path in ("/collective_rpc", "/sleep", "/reset_prefix_cache"):
        assert httpx.post(keyed_vllm + path, headers=auth, timeout=10).status_code == 404, path
    # coe sends the key named by api_key_env (compose: VLLM_API_KEY) and is answered; the same
    # expert without it is refused by the server, so the key is what let it through.
    data = {
        "experts": [
            {"name": "keyed", "engine": "remote", "max_model_len": 1024,
             "remote": {"base_url": keyed_vllm + "/v1", "model": "keyed",
                        "api_key_env": VLLM_KEY_ENV},
             "sampling": {"temperature": 0.0, "max_tokens": 8}},
            {"name": "keyless", "engine": "remote", "max_model_len": 1024,
             "remote": {"base_url": keyed_vllm + "/v1", "model": "keyed"},
             "sampling": {"temperature": 0.0, "max_tokens": 8}},
        ],
        "categories": [{"name": "general", "expert": "keyed"}],
    }  # fmt: skip
    config = tmp_path / "experts.yaml"
    config.write_text(yaml.safe_dump(data))
    client_key = new_key()
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = serve_env(**{VLLM_KEY_ENV: LONG_KEY, API_KEYS_ENV: client_key})
    cmd = [COE, "--config", str(config), "serve", "--port", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    gateway = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, gateway, log_path, "coe serve", 120)
        url = gateway + "/v1/chat/completions"
        mine = {"authorization": f"Bearer {client_key}"}
        ask = [{"role": "user", "content": "Say hi."}]
        answered = httpx.post(
            url, json={"model": "keyed", "messages": ask}, headers=mine, timeout=120
        )
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["message"]["content"]
        keyless = httpx.post(
            url, json={"model": "keyless", "messages": ask}, headers=mine, timeout=120
        )
        # A refused key is a misconfiguration (500), not an outage (503).
        assert keyless.status_code == 500, keyless.text
        assert keyless.json()["error"]["type"] == "server_error"
    finally:
        stop_processes(proc)
    assert LONG_KEY not in log_path.read_text() and client_key not in log_path.read_text()
