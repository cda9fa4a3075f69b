"""`coe up` / `coe status` / `coe down`, and `coe ask` / `coe chat` answering through the running
pool; stale pid files; the quiet terminal while engines start (coe.cli.quiet).

The engine tests share one pool started by `coe up` (module fixture); run them under the engine
lock: `flock /tmp/coe-engine.lock pytest tests/test_cli_up.py`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import psutil
import pytest

from coe.cli.background import RunFiles, ServerRecord, pool_id
from coe.paths import models_dir

from .conftest import COE, cancel_one_answer, cli_env, default_sigint

PLANET = "Name the largest planet in the solar system."


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A private COE_HOME (the run files land here) that sees the prepared models."""
    home = tmp_path_factory.mktemp("coe-home")
    (home / "models").symlink_to(models_dir(), target_is_directory=True)
    return home


def run_coe(home: Path, config: Path, *args: str, timeout: int = 600, **kw: object):
    return subprocess.run(
        [COE, "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout,
        env=cli_env(COE_HOME=str(home)), **kw,
    )  # fmt: skip


@dataclass
class Pool:
    home: Path
    config: Path
    record: ServerRecord
    # The server and every process it started (its engines). psutil.Process, not bare pids:
    # it knows each process's start time, so a pid reused later is never signalled.
    procs: list[psutil.Process]


@pytest.fixture(scope="module")
def pool(home: Path, test_pool_file: Path) -> Iterator[Pool]:
    up = run_coe(home, test_pool_file, "up")
    assert up.returncode == 0, up.stderr
    record = _record(home, test_pool_file)
    assert record is not None
    assert up.stdout.strip() == f"{record.url}/v1"
    assert record.host == "127.0.0.1"
    server = psutil.Process(record.pid)
    procs = [server, *server.children(recursive=True)]
    try:
        yield Pool(home, test_pool_file, record, procs)
    finally:
        run_coe(home, test_pool_file, "down")
        for proc in procs:  # whatever `coe down` left (it should leave nothing: see the test)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def _record(home: Path, config: Path) -> ServerRecord | None:
    files = RunFiles(home / "run" / pool_id(config))
    return ServerRecord.load(files)


def _served(pool: Pool) -> int:
    status = run_coe(pool.home, pool.config, "status", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    return int(json.loads(status.stdout)["requests_served"])


@pytest.mark.engine
def test_ask_answers_through_the_running_pool(pool: Pool) -> None:
    before = _served(pool)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [COE, "--config", str(pool.config), "ask", "--json", "--temperature", "0", PLANET],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(COE_HOME=str(pool.home)),
    )  # fmt: skip
    # No engine of its own: the ask process never has a child process (an in-process pool
    # spawns an EngineCore within seconds and takes about a minute to answer).
    children: set[str] = set()
    while proc.poll() is None:
        try:
            children |= {c.name() for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, err
    assert children == set()
    assert wall < 15, f"coe ask took {wall:.1f} s: did it start its own engine?"
    answer = json.loads(out)
    assert answer["expert"] == "qa" and answer["category"] == "general"
    assert "Jupiter" in answer["text"]
    assert answer["usage"]["completion_tokens"] > 0
    # The server counted it.
    assert _served(pool) == before + 1
    assert "coe up" not in err  # no hint to start a pool: one is running
    # The pool's request log has it as the CLI's (the server writes rows in batches).
    row: dict[str, object] = {}
    deadline = time.monotonic() + 10
    while row.get("prompt") != PLANET and time.monotonic() < deadline:
        logs = run_coe(pool.home, pool.config, "logs", "--json", "-n", "1", timeout=60)
        assert logs.returncode == 0, logs.stderr
        row = (json.loads(logs.stdout) or [{}])[0]
        time.sleep(0.2)
    assert (row["front_end"], row["expert"], row["category"]) == ("cli", "qa", "general")
    assert row["completion_tokens"] == answer["usage"]["completion_tokens"]


@pytest.mark.engine
def test_streamed_ask_prints_the_routing_line(pool: Pool) -> None:
    run = run_coe(pool.home, pool.config, "ask", "--temperature", "0", "--expert", "chatty",
                  "--max-tokens", "8", PLANET, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[0] == "[→ chatty]"
    assert run.stdout.strip()


@pytest.mark.engine
def test_piped_chat_through_the_pool_switches_experts(pool: Pool) -> None:
    lines = f"/expert chatty\n{PLANET}\n/auto\n{PLANET}\n/expert nobody\n"
    run = run_coe(pool.home, pool.config, "chat", "--temperature", "0", "--max-tokens", "8",
                  input=lines, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    headers = [line for line in run.stderr.splitlines() if line.startswith("[→")]
    assert headers == ["[→ chatty]", "[→ qa · general]"]
    assert "unknown expert 'nobody'; experts: qa, chatty" in run.stderr


@pytest.mark.engine
def test_chat_on_a_terminal_through_the_pool(pool: Pool) -> None:
    """Ctrl-C while the pool streams an answer cancels that answer only."""
    child = pexpect.spawn(
        COE,
        [
            "--config",
            str(pool.config),
            "chat",
            "--expert",
            "chatty",
            "--temperature",
            "0",
            "--max-tokens",
            "400",
        ],
        env=cli_env(COE_HOME=str(pool.home), TERM="dumb"),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
        preexec_fn=default_sigint,
    )
    try:
        child.expect_exact("you> ")
        cancel_one_answer(child, "[→ chatty]")
        child.sendline("/auto")
        child.expect_exact("you> ")
        child.sendline(PLANET)
        child.expect_exact("[→ qa · general]")
        child.expect("Jupiter")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.engine
def test_url_names_the_pool_and_bad_input_is_exit_2(pool: Pool, tmp_path: Path) -> None:
    # --url needs no experts.yaml of the pool's: one that does not exist is never read.
    run = run_coe(pool.home, tmp_path / "none.yaml", "ask", "--url", pool.record.url,
                  "--expert", "nobody", PLANET, timeout=60)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "unknown expert 'nobody'; the pool at" in run.stderr
    assert "serves: qa, chatty" in run.stderr


@pytest.mark.engine
def test_status_shows_the_pool(pool: Pool) -> None:
    run = run_coe(pool.home, pool.config, "status", "--json", timeout=60)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["pid"] == pool.record.pid and status["url"] == f"{pool.record.url}/v1"
    assert status["status"] == "ok" and status["uptime_s"] > 0
    assert {n: e["state"] for n, e in status["experts"].items()} == {"qa": "up", "chatty": "up"}
    assert all(e["tier"] == "hbm" for e in status["experts"].values())
    # A second experts.yaml (the same text, another file) is another pool: none runs for it.
    other = pool.home / "other" / "experts.yaml"
    other.parent.mkdir(exist_ok=True)
    other.write_text(pool.config.read_text())
    assert pool_id(other) != pool_id(pool.config)
    run = run_coe(pool.home, other, "status", timeout=60)
    assert run.returncode == 1 and "no pool is running" in run.stderr


@pytest.mark.engine
def test_up_twice_keeps_the_one_pool(pool: Pool) -> None:
    run = run_coe(pool.home, pool.config, "up", timeout=60)
    assert run.returncode == 0, run.stderr
    assert "already running" in run.stderr and run.stdout.strip() == f"{pool.record.url}/v1"


@pytest.mark.engine
def test_down_leaves_no_process_behind(pool: Pool) -> None:
    # Last in this file: the other tests use the pool.
    assert len(pool.procs) >= 2  # the server and its engine core at least
    run = run_coe(pool.home, pool.config, "down", timeout=120)
    assert run.returncode == 0, run.stderr
    assert "stopped" in run.stderr
    alive = [p.pid for p in pool.procs if _running(p)]
    assert alive == []
    assert _record(pool.home, pool.config) is None
    run = run_coe(pool.home, pool.config, "status", timeout=60)
    assert run.returncode == 1


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- without an engine -------------------------------------------------------------------------


def _fake_record(home: Path, config: Path, pid: int, process_start: float) -> RunFiles:
    files = RunFiles(home / "run" / pool_id(config))
    ServerRecord(
        pid=pid, url="http://127.0.0.1:9", host="127.0.0.1", port=9, config=str(config),
        log=str(files.server_log), started_at=time.time(), process_start=process_start,
    ).save(files)  # fmt: skip
    return files


@pytest.mark.parametrize("command", ["status", "down"])
def test_a_stale_pid_file_is_found_and_removed(tmp_path: Path, command: str) -> None:
    config = tmp_path / "experts.yaml"
    config.write_text("experts: []\n")  # never parsed by status/down
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    files = _fake_record(tmp_path, config, gone.pid, time.time())
    run = run_coe(tmp_path, config, command, timeout=60)
    assert "removed a stale pid file" in run.stderr and "is gone" in run.stderr
    assert not files.state.exists()
    assert run.returncode == (1 if command == "status" else 0)


def test_a_reused_pid_is_not_taken_for_the_server(tmp_path: Path) -> None:
    """The pid runs, but it is another program: the pid file is stale, the program untouched."""
    config = tmp_path / "experts.yaml"
    config.write_text("experts: []\n")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = _fake_record(tmp_path, config, other.pid, psutil.Process(other.pid).create_time())
        run = run_coe(tmp_path, config, "down", timeout=60)
        assert "another program" in run.stderr, run.stderr
        assert not files.state.exists()
        assert other.poll() is None  # `coe down` did not signal it
    finally:
        other.kill()
        other.wait()


def test_up_reports_a_server_that_dies_while_starting(tmp_path: Path) -> None:
    config = tmp_path / "experts.yaml"
    # Valid for coe, but the model folder does not exist: the engine fails to start.
    config.write_text(
        "experts: [{name: broken, model: ./no-such-model, max_model_len: 512}]\n"
        "categories: [{name: general, expert: broken}]\n"
    )
    run = run_coe(tmp_path, config, "up", "--timeout", "300", timeout=400)
    assert run.returncode == 1, run.stderr
    assert "exited" in run.stderr and "no-such-model" in run.stderr  # the log's tail
    assert not RunFiles(tmp_path / "run" / pool_id(config)).state.exists()


def test_engine_output_goes_to_the_log(tmp_path: Path) -> None:
    """What a child process spawned inside output_to_log writes lands in the log; the stream it
    yields (the spinner's) and anything after the block reach the real stderr."""
    log = tmp_path / "run" / "engine.log"
    script = (
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        "from coe.cli.quiet import output_to_log\n"
        f"with output_to_log(Path({str(log)!r})) as terminal:\n"
        "    subprocess.run(['sh', '-c', 'echo child-out; echo child-err >&2'])\n"
        "    terminal.write('spinner\\n')\n"
        "print('after', file=sys.stderr)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env=cli_env())  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert log.read_text().split() == ["child-out", "child-err"]
    assert run.stderr.split() == ["spinner", "after"] and run.stdout == ""


def test_status_all_lists_every_running_pool(tmp_path: Path) -> None:
    """Two pools side by side, each in its own run folder (stand-in processes whose command
    line names `serve` and their experts.yaml, as `coe up`'s do; nothing listens)."""
    configs = [tmp_path / name / "experts.yaml" for name in ("one", "two")]
    procs = []
    try:
        for config in configs:
            config.parent.mkdir()
            config.write_text("experts: []\n")
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                     "serve", str(config)])  # fmt: skip
            procs.append(proc)
            _fake_record(tmp_path, config, proc.pid, psutil.Process(proc.pid).create_time())
        run = run_coe(tmp_path, configs[0], "status", "--all", "--json", timeout=60)
        assert run.returncode == 0, run.stderr
        listed = json.loads(run.stdout)
        assert sorted(p["config"] for p in listed) == sorted(str(c) for c in configs)
        assert sorted(p["pid"] for p in listed) == sorted(p.pid for p in procs)
        assert all("not answering" in p["status"] for p in listed)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("category", "confidence", "fell_back", "line"),
    [
        ("general", 0.9612, False, "[→ qa · general · 0.96]"),
        ("general", 0.31, True, "[→ qa · general (fallback) · 0.31]"),
        (None, None, False, "[→ qa]"),
    ],
)
def test_the_routing_line_through_the_gateway_is_the_in_process_one(
    category: str | None, confidence: float | None, fell_back: bool, line: str
) -> None:
    """The gateway's x-coe-* headers carry what `coe ask` prints: the same routing line."""
    from coe.cli.answerer import decision_from_headers
    from coe.cli.chat_session import format_decision
    from coe.gateway.call import decision_headers
    from coe.types import RouteDecision

    local = RouteDecision("qa", category, confidence, fell_back, "router")
    remote = decision_from_headers(decision_headers(local, "miss"))
    assert format_decision(local) == format_decision(remote) == line
