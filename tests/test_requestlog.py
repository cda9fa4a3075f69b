"""The request log: the writer (batches, a log that cannot be written never fails or blocks a
request), the records the orchestrator makes for each front end, `coe logs` and `coe logs stats`
through click, and the real gateway (the openai client over HTTP, on echo engines) logging what
it answers, across a restart and with a read-only log folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from coe.cache.pool import EnginePool
from coe.cli import main
from coe.config import ConfigError, PoolConfig, RequestLogSettings, parse_config
from coe.gateway.server import GatewayServer, open_store_on_loop
from coe.orchestrator import Orchestrator, Origin
from coe.requestlog import LogWriter, RequestLog, RequestRecord
from coe.requestlog.query import Filters, parse_since, read_records, summarize
from coe.runtime import BackgroundLoop
from coe.types import Message

from .test_gateway import KEY, EchoEngine, KeywordRouter, gateway_pool


def record(**fields: object) -> RequestRecord:
    base: dict[str, object] = {"time": time.time(), "front_end": "cli", "expert": "coder"}
    return RequestRecord(**{**base, **fields})  # type: ignore[arg-type]


def rows(path: Path) -> list[RequestRecord]:
    return read_records(path, Filters())


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """A folder nothing can be written in. chmod does not stop root: then the immutable flag
    (chattr +i) does; where neither works the test cannot be made, and is skipped."""
    path.mkdir(parents=True)
    path.chmod(0o555)
    immutable = False
    probe = path / "probe"
    try:
        probe.touch()
    except OSError:
        pass
    else:
        probe.unlink()
        chattr = shutil.which("chattr")
        done = chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True)
        if not done or done.returncode != 0:
            path.chmod(0o755)
            pytest.skip("cannot make a read-only folder here (root, and no chattr +i)")
        immutable = True
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


# -- the writer ----------------------------------------------------------------------------------


def test_writer_writes_in_batches_off_the_callers_thread(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "requests.sqlite"
    transactions: list[str] = []

    def counting(p: Path, timeout: float) -> sqlite3.Connection:
        from coe.requestlog.writer import connect

        conn = connect(p, timeout)
        conn.set_trace_callback(lambda sql: transactions.append(sql) if sql == "BEGIN " else None)
        return conn

    # A flush interval of a minute: nothing is written until flush() wakes the thread.
    writer = LogWriter(path, batch_size=100, flush_interval_s=60, connect_to=counting)
    try:
        for i in range(250):
            writer.put(record(request_id=str(i)))
        assert writer.pending == 250 and not path.exists()  # put() only queued them
        assert writer.flush()
        assert (writer.written, writer.dropped, writer.pending) == (250, 0, 0)
        assert len(transactions) == 3  # 100 + 100 + 50: one transaction per batch
        assert [r.request_id for r in rows(path)] == [str(i) for i in range(250)]
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        writer.close()
    writer.put(record())  # after close: dropped, not an error
    assert writer.dropped == 1


def test_prompt_policy_keeps_hashes_or_drops_the_prompt(tmp_path: Path) -> None:
    for policy, kept, hashed in (
        ("keep", True, True),
        ("hash", False, True),
        ("none", False, False),
    ):
        path = tmp_path / f"{policy}.sqlite"
        writer = LogWriter(path, prompts=policy)  # type: ignore[arg-type]
        writer.put(record(prompt="the secret plan"))
        writer.close()
        (row,) = rows(path)
        assert (row.prompt == "the secret plan") is kept and (row.prompt is None) is not kept
        expected = hashlib.sha256(b"the secret plan").hexdigest() if hashed else None
        assert row.prompt_sha256 == expected


def test_read_only_folder_drops_records_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with read_only_folder(tmp_path / "ro") as folder:
        writer = LogWriter(folder / "logs" / "requests.sqlite", flush_interval_s=60)
        with caplog.at_level(logging.WARNING, logger="coe.requestlog.writer"):
            for _ in range(3):
                writer.put(record())
            assert writer.flush()
            writer.put(record())
            assert writer.flush()
        assert (writer.written, writer.dropped) == (0, 4)
        assert writer.problem is not None
        warnings = [r for r in caplog.records if "cannot write the request log" in r.message]
        assert len(warnings) == 1
    # Writable again: the next records are written.
    writer.put(record())
    assert writer.flush()
    writer.close()
    assert (writer.written, writer.problem) == (1, None)


def test_a_log_path_under_a_file_drops_records(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a folder")
    writer = LogWriter(tmp_path / "plain-file" / "requests.sqlite")
    writer.put(record())
    writer.close()
    assert (writer.written, writer.dropped) == (0, 1)


def test_a_locked_database_neither_blocks_nor_fails(tmp_path: Path) -> None:
    path = tmp_path / "requests.sqlite"
    LogWriter(path).close()  # the file and its table exist
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the file
    writer = LogWriter(path, max_queue=3, flush_interval_s=60, busy_timeout_s=0.2)
    try:
        for _ in range(10):
            writer.put(record())  # returns at once: a full queue drops, it never waits
        assert (writer.pending, writer.dropped) == (3, 7)
        assert writer.flush()
        assert (writer.written, writer.dropped) == (0, 10)
        assert writer.problem is not None and "locked" in writer.problem
        holder.execute("COMMIT")
        writer.put(record(expert="after"))
        assert writer.flush()
        assert writer.written == 1
    finally:
        holder.close()
        writer.close()
    assert [r.expert for r in rows(path)] == ["after"]


def test_a_file_of_another_schema_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "requests.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    writer = LogWriter(path)
    writer.put(record())
    writer.close()
    assert writer.dropped == 1 and "schema 99" in (writer.problem or "")


# -- configuration -------------------------------------------------------------------------------


def test_log_settings_are_checked_by_key(tmp_path: Path) -> None:
    data = gateway_pool().model_dump(exclude={"gateway", "log"})
    with pytest.raises(ConfigError, match=r"log\.prompts: Input should be 'keep', 'hash'"):
        parse_config({**data, "log": {"prompts": "maybe"}}, tmp_path / "experts.yaml")
    with pytest.raises(ConfigError, match=r"log\.path: 'logs' is a folder"):
        (tmp_path / "logs").mkdir()
        parse_config({**data, "log": {"path": "logs"}}, tmp_path / "experts.yaml")
    config = parse_config({**data, "log": {"path": "logs/mine.sqlite"}}, tmp_path / "experts.yaml")
    assert config.request_log_path == tmp_path / "logs" / "mine.sqlite"
    off = parse_config({**data, "log": {"enabled": False}}, tmp_path / "experts.yaml")
    assert not RequestLog.open(off, "cli").enabled


def test_the_default_log_lives_under_coe_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COE_LOG_DB")  # conftest's, for the run
    config = gateway_pool()
    assert config.request_log_path == tmp_path / "home" / "logs" / "requests.sqlite"
    monkeypatch.setenv("COE_LOG_DB", str(tmp_path / "elsewhere.sqlite"))
    assert config.request_log_path == tmp_path / "elsewhere.sqlite"
    named = config.model_copy(update={"log": RequestLogSettings(path="/srv/log.sqlite")})
    assert named.request_log_path == Path("/srv/log.sqlite")  # the file's own beats the env


# -- the orchestrator's records (the CLI's and the eval's front ends) ---------------------------


def echo_orchestrator(config: PoolConfig, log: RequestLog) -> Orchestrator:
    engines = EnginePool(config, factory=lambda cfg, expert, name: EchoEngine(name))
    return Orchestrator(config, engines, router=KeywordRouter(), requests=log)


def test_orchestrator_records_each_request_once(tmp_path: Path) -> None:
    path = tmp_path / "requests.sqlite"
    log = RequestLog(LogWriter(path, flush_interval_s=60), front_end="cli", pool="here")
    orch = echo_orchestrator(gateway_pool(), log)
    runner = BackgroundLoop()
    try:
        result = runner.run(orch.chat([{"role": "user", "content": "write code please"}]))
        assert result.text == "coder: write code please"
        runner.run(orch.chat([{"role": "user", "content": "a poem"}], expert="writer"))
        # A failure before the stream: recorded as the request's end.
        with pytest.raises(Exception, match="unknown expert"):
            runner.run(orch.chat([{"role": "user", "content": "x"}], expert="nobody"))

        async def cut_short() -> None:  # the caller stops reading after the first chunk
            _, _, chunks = await orch.stream(
                [Message("user", "tell me about code")], origin=Origin("eval", model="auto")
            )
            await anext(chunks)
            await chunks.aclose()

        runner.run(cut_short())
        # An error inside the stream (the engine fails before any output, no fallback).
        with pytest.raises(Exception, match="is down"):
            runner.run(orch.chat([{"role": "user", "content": "boom"}]))
        assert log.flush()
    finally:
        runner.run(orch.close())
        runner.close()
    routed, named, unknown, cut, failed = rows(path)
    assert (routed.front_end, routed.model, routed.expert, routed.category) == (
        "cli",
        "auto",
        "coder",
        "coding",
    )
    assert (routed.confidence, routed.fallback, routed.routed_by) == (0.9, False, "router")
    assert (routed.prompt_tokens, routed.completion_tokens, routed.finish_reason) == (3, 4, "stop")
    assert routed.answer_chars == len(result.text) and routed.prompt == "write code please"
    assert routed.ttft_s is not None and routed.latency_s is not None
    assert 0 < routed.ttft_s <= routed.latency_s and routed.pool == "here"
    assert routed.error is None and routed.cache is None and routed.messages == 1
    assert (named.model, named.expert, named.category) == ("writer", "writer", None)
    assert unknown.model == "nobody" and "UnknownExpertError" in (unknown.error or "")
    assert (cut.front_end, cut.expert) == ("eval", "coder")
    assert cut.error is not None and cut.error.startswith("Cancelled")
    # The two experts share one engine (same model), named after the first.
    assert failed.error == "EngineError: engine coder is down" and failed.ttft_s is None


# -- coe logs ----------------------------------------------------------------------------------


def write_log(path: Path, records: list[RequestRecord]) -> None:
    writer = LogWriter(path)
    for r in records:
        writer.put(r)
    writer.close()
    assert writer.written == len(records)


def logs_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["logs", *args])
    return result.exit_code, result.output


@pytest.fixture
def sample_log(tmp_path: Path) -> Path:
    now = time.time()
    path = tmp_path / "requests.sqlite"
    old = now - 3 * 3600
    spec = [
        # (age s, expert, category, fallback, latency, ttft, error)
        (old, "coder", "coding", False, 0.5, 0.1, None),
        (now - 60, "coder", "coding", False, 1.0, 0.2, None),
        (now - 50, "coder", "coding", False, 2.0, 0.3, None),
        (now - 40, "writer", "writing", False, 4.0, 0.4, None),
        (now - 30, "writer", "general", True, 8.0, 0.5, None),
        (now - 20, "writer", "general", True, 0.1, None, "EngineError: down"),
    ]
    write_log(
        path,
        [
            record(time=t, expert=e, category=c, fallback=f, latency_s=lat, ttft_s=ttft,
                   error=err, prompt=f"prompt {i}", front_end="gateway" if i % 2 else "cli")
            for i, (t, e, c, f, lat, ttft, err) in enumerate(spec)
        ],
    )  # fmt: skip
    return path


def test_coe_logs_lists_and_filters(sample_log: Path) -> None:
    db = ["--db", str(sample_log)]
    code, out = logs_cli(*db, "--json")
    assert code == 0
    listed = json.loads(out)
    assert [r["prompt"] for r in listed] == [f"prompt {i}" for i in range(6)]  # oldest first
    code, out = logs_cli(*db, "--json", "-n", "2")
    assert [r["prompt"] for r in json.loads(out)] == ["prompt 4", "prompt 5"]
    code, out = logs_cli(*db, "--json", "--expert", "coder", "-n", "0")
    assert [r["prompt"] for r in json.loads(out)] == ["prompt 0", "prompt 1", "prompt 2"]
    code, out = logs_cli(*db, "--json", "--category", "general")
    assert [r["prompt"] for r in json.loads(out)] == ["prompt 4", "prompt 5"]
    code, out = logs_cli(*db, "--json", "--since", "10m", "--expert", "coder")
    assert [r["prompt"] for r in json.loads(out)] == ["prompt 1", "prompt 2"]
    code, out = logs_cli(*db, "--json", "--front-end", "gateway")
    assert [r["prompt"] for r in json.loads(out)] == ["prompt 1", "prompt 3", "prompt 5"]
    # A table for people (tab-separated off a terminal), errors shown in place of the prompt.
    code, out = logs_cli(*db, "-n", "1")
    header, line = out.strip().splitlines()
    assert header.startswith("time\tfrom\tclient\tmodel\tcategory")
    assert "general (fb)" in line and "error: EngineError: down" in line
    code, out = logs_cli(*db, "--since", "yesterday-ish")
    assert code == 2 and "--since 'yesterday-ish'" in out
    code, out = logs_cli(*db, "stats")  # the list's options are not the subcommand's
    assert code == 2 and "give the options after `stats`" in out


def test_since_reads_durations_and_iso_times() -> None:
    now = 1_800_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    zoned = datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert parse_since("2027-01-15T08:00:00+00:00", now) == zoned
    assert parse_since("2027-01-15T08:00", now) == datetime(2027, 1, 15, 8).timestamp()


def test_coe_logs_stats(sample_log: Path, tmp_path: Path) -> None:
    code, out = logs_cli("stats", "--db", str(sample_log), "--json")
    assert code == 0, out
    s = json.loads(out)
    assert (s["requests"], s["errors"], s["fallbacks"]) == (6, 1, 2)
    assert s["fallback_rate"] == round(2 / 6, 4)
    assert s["categories"][0] == {"name": "coding", "count": 3, "share": 0.5}
    coder, writer = s["experts"]
    assert (coder["expert"], coder["count"], coder["errors"]) == ("coder", 3, 0)
    # Nearest rank over [0.5, 1, 2]: p50 the second, p90 and p99 the third.
    assert coder["latency_s"] == {"p50": 1.0, "p90": 2.0, "p99": 2.0}
    assert coder["ttft_s"] == {"p50": 0.2, "p90": 0.3, "p99": 0.3}
    # The failed request counts in the mix and the errors, not in the percentiles.
    assert (writer["count"], writer["errors"]) == (3, 1)
    assert writer["latency_s"] == {"p50": 8.0, "p90": 8.0, "p99": 8.0}
    code, out = logs_cli("stats", "--db", str(sample_log), "--json", "--since", "2h")
    assert json.loads(out)["requests"] == 5
    png = tmp_path / "plots" / "mix.png"
    code, out = logs_cli("stats", "--db", str(sample_log), "--plot", str(png), "--by", "expert")
    assert code == 0, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "routing mix by category" in out and "coder" in out


def test_coe_logs_on_a_missing_log(tmp_path: Path) -> None:
    code, out = logs_cli("--db", str(tmp_path / "none.sqlite"), "--json")
    assert (code, json.loads(out)) == (0, [])
    assert summarize([])["requests"] == 0


# -- the real gateway ----------------------------------------------------------------------------


@dataclass
class LoggedGateway:
    server: GatewayServer
    orch: Orchestrator
    runner: BackgroundLoop

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=KEY, max_retries=0)

    def stop(self) -> None:
        self.server.stop()
        self.runner.run(self.orch.close())  # writes what the log has queued
        self.runner.close()


def logged_gateway(log_path: Path) -> LoggedGateway:
    """A gateway on echo engines whose experts.yaml logs to ``log_path``."""
    config = gateway_pool().model_copy(update={"log": RequestLogSettings(path=str(log_path))})
    runner = BackgroundLoop()
    engines = EnginePool(config, factory=lambda cfg, expert, name: EchoEngine(name))
    store = runner.run(open_store_on_loop(None))
    log = RequestLog.open(config, "gateway")
    orch = Orchestrator(config, engines, router=KeywordRouter(), store=store, requests=log)
    server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
    server.start()
    return LoggedGateway(server, orch, runner)


def logged(path: Path, *args: str) -> list[dict]:
    code, out = logs_cli("--db", str(path), "--json", "-n", "0", *args)
    assert code == 0, out
    return json.loads(out)


def test_gateway_requests_show_up_in_coe_logs(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "requests.sqlite"
    gw = logged_gateway(path)
    try:
        client = gw.client()
        ask = [{"role": "user", "content": "write code please"}]
        first = client.chat.completions.create(model="auto", messages=ask, max_tokens=10)
        again = client.chat.completions.with_raw_response.create(
            model="auto", messages=ask, max_tokens=10
        )
        assert again.headers["x-coe-cache"] == "hit"
        stream = client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "a poem about rain"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == "writer: a poem about rain"
        # `coe ask` through a running pool says so: its requests are the CLI's.
        client.chat.completions.create(
            model="writer",
            messages=[{"role": "user", "content": "from the cli"}],
            extra_headers={"x-coe-front-end": "cli"},
        )
        anthropic = httpx.post(
            gw.server.url + "/v1/messages",
            json={"model": "coder", "max_tokens": 10, "messages": ask},
            headers={"x-api-key": KEY},
            timeout=10,
        )
        assert anthropic.status_code == 200, anthropic.text
        two = client.chat.completions.create(
            model="auto:writing", messages=ask, max_tokens=10, n=2, seed=3
        )
        assert len(two.choices) == 2
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "boom"}]
            )
    finally:
        gw.stop()
    hit, miss = "hit", "miss"
    got = logged(path)
    assert [(r["model"], r["expert"], r["category"], r["cache"]) for r in got] == [
        ("auto", "coder", "coding", miss),
        ("auto", "coder", "coding", hit),
        ("auto", "writer", "writing", "bypass"),  # sampled (temperature 0.8): not cached
        ("writer", "writer", None, "bypass"),
        ("coder", "coder", None, miss),
        ("auto:writing", "writer", "writing", miss),
        ("auto", "writer", "writing", None),  # failed before the cache was asked
    ]
    assert [r["front_end"] for r in got] == ["gateway"] * 3 + ["cli"] + ["gateway"] * 3
    assert {r["client"] for r in got} == {"key:tester"}
    generated = got[0]
    assert generated["request_id"] == first.id and generated["confidence"] == 0.9
    assert generated["routed_by"] == "router" and generated["fallback"] is False
    assert (generated["prompt_tokens"], generated["completion_tokens"]) == (3, 4)
    assert 0 < generated["ttft_s"] <= generated["latency_s"]
    assert got[1]["ttft_s"] is None and got[1]["completion_tokens"] == 4  # the cached answer's
    assert got[2]["answer_chars"] == len(streamed) and got[2]["finish_reason"] == "stop"
    assert got[4]["request_id"].startswith("msg_") and got[4]["routed_by"] == "caller"
    assert got[5]["completion_tokens"] == 8 and got[5]["answer_chars"] == 2 * len(
        "writer: write code please"
    )  # two choices, one record
    assert got[6]["error"] == "EngineError: engine coder is down"
    assert all(r["error"] is None for r in got[:6])
    assert [r["prompt"] for r in logged(path, "--expert", "coder")] == ["write code please"] * 3
    stats = json.loads(logs_cli("stats", "--db", str(path), "--json")[1])
    assert (stats["requests"], stats["errors"], stats["cache"]["hit"]) == (7, 1, 1)


def test_the_log_survives_a_gateway_restart(tmp_path: Path) -> None:
    path = tmp_path / "requests.sqlite"
    for turn in ("before", "after"):
        gw = logged_gateway(path)
        try:
            gw.client().chat.completions.create(
                model="auto", messages=[{"role": "user", "content": f"code {turn}"}]
            )
        finally:
            gw.stop()
    assert [r["prompt"] for r in logged(path)] == ["code before", "code after"]


def test_a_read_only_log_folder_does_not_fail_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with read_only_folder(tmp_path / "ro") as folder:
        gw = logged_gateway(folder / "requests.sqlite")
        try:
            client = gw.client()
            for text in ("write code", "a poem"):
                reply = client.chat.completions.create(
                    model="auto", messages=[{"role": "user", "content": text}]
                )
                assert reply.choices[0].message.content.endswith(text)
            chunks = client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "more code"}], stream=True
            )
            assert "more code" in "".join(c.choices[0].delta.content or "" for c in chunks)
            writer = gw.orch.requests.writer
            assert writer is not None and gw.orch.requests.flush()
            assert (writer.written, writer.dropped) == (0, 3)
        finally:
            gw.stop()
    assert "cannot write the request log" in caplog.text
    assert not (tmp_path / "ro" / "requests.sqlite").exists()
    assert os.access(tmp_path / "ro", os.W_OK)  # the fixture undid its flag
