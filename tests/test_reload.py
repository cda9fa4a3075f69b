"""Changing the pool while the gateway serves (coe.gateway.live), on engines that answer slowly
on purpose: a reload keeps the engines whose key is unchanged, serves new experts at once, lets
requests in flight finish on the pool they started with and only then shuts down the engines
no expert uses; a broken file, or a key without admin rights, changes nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from coe.cache.pool import EnginePool
from coe.config import ConfigError, Expert, PoolConfig, load_config
from coe.gateway.auth import hash_key
from coe.gateway.server import GatewayServer, open_store_on_loop
from coe.orchestrator import Orchestrator
from coe.runtime import BackgroundLoop
from coe.types import Chunk, Prompt, SamplingParams, Usage

ADMIN_KEY = "coe-admin-key-for-the-reload-tests-0001"
CLIENT_KEY = "coe-client-key-for-the-reload-tests-001"


class TickEngine:
    """Answers "<engine name> 1 2 ... n" one word every ``tick_s``; remembers its shutdown."""

    tick_s = 0.05

    def __init__(self, name: str):
        self.name = name
        self.ready = False
        self.starts = 0
        self.shut_down_at: float | None = None

    async def start(self) -> None:
        if not self.ready:  # as vLLM engines: starting a started engine does nothing
            self.ready = True
            self.starts += 1

    async def shutdown(self) -> None:
        self.ready = False
        self.shut_down_at = time.monotonic()

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        if not self.ready:
            raise RuntimeError(f"engine {self.name} was shut down")
        words = [self.name, *(str(i) for i in range(1, sampling.max_tokens))]
        for i, word in enumerate(words):
            await asyncio.sleep(self.tick_s)
            if not self.ready:  # shut down under a running request: what a reload must avoid
                raise RuntimeError(f"engine {self.name} was shut down mid-answer")
            yield Chunk(word if i == 0 else " " + word)
        yield Chunk("", "length", Usage(1, len(words)))


def pool_data(*experts: str, remap: str | None = None) -> dict[str, object]:
    """A pool of experts named for their models (one engine each), all categories on the
    first (or ``remap``)."""
    entries = [
        {"name": e, "model": f"/models/{e}", "sampling": {"temperature": 0, "max_tokens": 8}}
        for e in experts
    ]
    return {
        "experts": entries,
        "categories": [{"name": "general", "expert": remap or experts[0]}],
        "gateway": {
            "api_keys": [
                {"name": "ops", "sha256": hash_key(ADMIN_KEY), "admin": True},
                {"name": "app", "sha256": hash_key(CLIENT_KEY)},
            ]
        },
    }


def write(path: Path, data: object) -> None:
    path.write_text(yaml.safe_dump(data))


class Running:
    def __init__(self, path: Path):
        self.path = path
        self.runner = BackgroundLoop()
        self.engines: dict[str, TickEngine] = {}
        config = load_config(path)
        pool = EnginePool(config, factory=self._engine)
        store = self.runner.run(open_store_on_loop(None))
        self.orch = Orchestrator(config, pool, store=store)
        self.runner.run(self.orch.start())
        self.server = GatewayServer(self.orch, self.runner, host="127.0.0.1", port=0)
        self.server.start()

    def _engine(self, config: PoolConfig, expert: Expert, name: str) -> TickEngine:
        self.engines[name] = TickEngine(name)
        return self.engines[name]

    def admin(self, method: str, path: str, key: str = ADMIN_KEY, **kw: object) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=CLIENT_KEY, max_retries=0)

    def models(self) -> list[str]:
        return [m.id for m in self.client().models.list().data]

    def ask(self, model: str) -> str:
        reply = self.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "count"}]
        )
        return reply.choices[0].message.content or ""

    def close(self) -> None:
        self.server.stop()
        self.runner.run(self.orch.close())
        self.runner.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Running]:
    path = tmp_path / "experts.yaml"
    write(path, pool_data("alpha", "beta"))
    running = Running(path)
    try:
        yield running
    finally:
        running.close()


def test_reload_adds_an_expert_and_keeps_the_running_engines(gateway: Running) -> None:
    alpha = gateway.engines["alpha"]
    write(gateway.path, pool_data("alpha", "beta", "gamma"))
    reply = gateway.admin("POST", "/admin/reload")
    assert reply.status_code == 200, reply.text
    report = reply.json()
    assert report["experts"] == {"added": ["gamma"], "removed": [], "changed": []}
    assert report["engines"] == {"started": 1, "kept": 2, "retiring": 0}
    assert "gamma" in gateway.models()
    assert gateway.ask("gamma").startswith("gamma 1")
    # The engine of an unchanged expert is the same object; only gamma's was built.
    assert gateway.ask("alpha").startswith("alpha 1")
    assert gateway.server.live.service.orch.engines.engine_for("alpha") is alpha
    assert sorted(gateway.engines) == ["alpha", "beta", "gamma"]
    assert alpha.starts == 1 and alpha.shut_down_at is None


def test_a_stream_in_flight_finishes_on_the_pool_it_started_with(gateway: Running) -> None:
    """beta is removed while it streams: its answer completes, and its engine is shut down
    only after that; requests arriving after the reload see the new pool."""
    beta = gateway.engines["beta"]
    got: dict[str, object] = {}

    def stream() -> None:
        parts = []
        events = gateway.client().chat.completions.create(
            model="beta",
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            max_tokens=40,
        )
        for event in events:
            if event.choices and event.choices[0].delta.content:
                parts.append(event.choices[0].delta.content)
            if event.choices and event.choices[0].finish_reason:
                got["finish"] = event.choices[0].finish_reason
        got["text"], got["ended_at"] = "".join(parts), time.monotonic()

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.5)  # the stream is under way (40 words at 50 ms each: 2 s)
    write(gateway.path, pool_data("alpha"))
    reply = gateway.admin("POST", "/admin/reload")
    assert reply.status_code == 200, reply.text
    assert reply.json()["engines"]["retiring"] == 1
    assert "beta" not in gateway.models()
    reader.join(timeout=30)
    assert got["finish"] == "length"
    assert str(got["text"]).startswith("beta 1 2") and str(got["text"]).endswith(" 39")
    deadline = time.monotonic() + 10
    while beta.shut_down_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert beta.shut_down_at is not None, "the removed expert's engine was never shut down"
    assert beta.shut_down_at >= float(got["ended_at"]) - 0.2  # type: ignore[arg-type]
    assert gateway.engines["alpha"].shut_down_at is None


def test_a_broken_file_is_refused_with_the_start_error_and_changes_nothing(
    gateway: Running,
) -> None:
    broken = pool_data("alpha", "beta")
    broken["experts"][1]["max_token"] = 5  # type: ignore[index]
    write(gateway.path, broken)
    with pytest.raises(ConfigError) as at_start:
        load_config(gateway.path)
    reply = gateway.admin("POST", "/admin/reload")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "invalid_config"
    assert error["message"] == str(at_start.value)
    assert "experts[1].max_token" in error["message"]
    assert sorted(gateway.models()) == ["alpha", "auto", "auto:general", "beta"]
    assert gateway.ask("auto").startswith("alpha 1")


def test_admin_needs_an_admin_key(gateway: Running) -> None:
    assert gateway.admin("POST", "/admin/reload", key=CLIENT_KEY).status_code == 403
    assert gateway.admin("POST", "/admin/reload", key="coe-wrong").status_code == 401
    assert gateway.admin("POST", "/admin/reload").status_code == 200


def test_a_remap_changes_where_auto_goes(gateway: Running) -> None:
    assert gateway.ask("auto").startswith("alpha")
    write(gateway.path, pool_data("alpha", "beta", remap="beta"))
    reply = gateway.admin("POST", "/admin/reload")
    assert reply.json()["engines"] == {"started": 0, "kept": 2, "retiring": 0}
    assert gateway.ask("auto").startswith("beta")


def test_sighup_reload_reports_a_refusal_and_a_success(gateway: Running) -> None:
    said: list[str] = []
    write(gateway.path, {"experts": "not a list"})
    gateway.server.reload_soon(said.append)
    write_after = time.monotonic() + 10
    while not said and time.monotonic() < write_after:
        time.sleep(0.05)
    assert said and said[0].startswith("reload refused, the pool is unchanged")
    write(gateway.path, pool_data("alpha", "beta", "gamma"))
    gateway.server.reload_soon(said.append)
    while len(said) < 2 and time.monotonic() < write_after:
        time.sleep(0.05)
    assert said[1].startswith("reloaded:") and "gamma" in gateway.models()


def test_adapters_cannot_be_unloaded_when_defined_in_the_file(gateway: Running) -> None:
    reply = gateway.admin("DELETE", "/admin/adapters/beta")
    assert reply.status_code == 400
    assert "defined in experts.yaml" in reply.json()["error"]["message"]
    reply = gateway.admin(
        "POST", "/admin/adapters", json={"name": "beta", "base": "alpha", "adapter": "x"}
    )
    assert reply.status_code == 400 and "exists already" in reply.json()["error"]["message"]


def test_keys_new_admin_makes_an_admin_entry() -> None:
    from click.testing import CliRunner

    from coe.cli import main
    from coe.config import ApiKey

    result = CliRunner().invoke(main, ["keys", "new", "--name", "ops", "--admin"])
    assert result.exit_code == 0, result.output
    entry = yaml.safe_load(result.stdout.strip().removeprefix("- ").strip())
    assert ApiKey(**entry).admin is True
