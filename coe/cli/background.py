"""A pool kept running in the background (`coe up`, `coe down`, `coe status`, and `coe ask` /
`coe chat` finding it): its run files, and starting, finding and stopping its `coe serve`.

Each experts.yaml gets its own folder, ``$COE_HOME/run/<pool-id>/``, named from the file's
resolved path, so pools on two files run side by side:

- ``server.json``: pid, url, the experts.yaml, when it started, the process's start time;
- ``server.log``: the server's output (its engines' logs too);
- ``engine.log``: the engines' output of `coe ask` / `coe chat` run in-process on a terminal.

A pid file whose process is gone, or is another program now (pids are reused: the process's
start time and command line must match), is stale: it is removed where it is found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from coe.paths import coe_home

STATE_FILE = "server.json"
SERVER_LOG = "server.log"
ENGINE_LOG = "engine.log"
# A pid file's process start time may differ from psutil's by rounding.
_START_TIME_SLACK_S = 1.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_root() -> Path:
    return coe_home() / "run"


def pool_id(config_file: Path) -> str:
    """A folder name for this experts.yaml: readable (its parent folder and stem) and unique (a
    hash of its resolved path)."""
    resolved = config_file.expanduser().resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{resolved.parent.name}-{resolved.stem}")
    return f"{readable.strip('_')[:40]}-{digest}"


@dataclass(frozen=True)
class RunFiles:
    folder: Path

    @classmethod
    def for_config(cls, config_file: Path) -> RunFiles:
        return cls(run_root() / pool_id(config_file))

    @property
    def state(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def server_log(self) -> Path:
        return self.folder / SERVER_LOG

    @property
    def engine_log(self) -> Path:
        return self.folder / ENGINE_LOG


@dataclass(frozen=True)
class ServerRecord:
    """What server.json holds about one background `coe serve`."""

    pid: int
    url: str
    host: str
    port: int
    config: str
    log: str
    started_at: float  # epoch seconds
    process_start: float  # psutil's create_time of the pid: tells a reused pid apart

    def save(self, files: RunFiles) -> None:
        files.folder.mkdir(parents=True, exist_ok=True)
        tmp = files.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(files.state)  # readers never see half a file

    @classmethod
    def load(cls, files: RunFiles) -> ServerRecord | None:
        try:
            data = json.loads(files.state.read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            # A damaged file cannot name a process to stop: it is as good as stale.
            raise StaleRecordError(f"unreadable {files.state} ({exc})") from None

    @property
    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.started_at)


class StaleRecordError(Exception):
    """server.json names no running `coe serve` of this pool; the message says why."""


def server_process(record: ServerRecord) -> psutil.Process:
    """The record's live `coe serve` process, or StaleRecordError saying why it is not."""
    try:
        proc = psutil.Process(record.pid)
        created = proc.create_time()
        cmdline = proc.cmdline()
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise StaleRecordError(f"pid {record.pid} has exited")
    except psutil.NoSuchProcess:
        raise StaleRecordError(f"pid {record.pid} is gone") from None
    except psutil.AccessDenied:
        raise StaleRecordError(f"pid {record.pid} belongs to someone else") from None
    if abs(created - record.process_start) > _START_TIME_SLACK_S or not _is_serve_of(
        cmdline, record.config
    ):
        raise StaleRecordError(f"pid {record.pid} is another program now")
    return proc


def _is_serve_of(cmdline: list[str], config: str) -> bool:
    return "serve" in cmdline and config in cmdline


def find_server(files: RunFiles, say: Callable[[str], None]) -> ServerRecord | None:
    """The running server of these run files; a stale record is removed (and ``say`` tells)."""
    try:
        record = ServerRecord.load(files)
        if record is None:
            return None
        server_process(record)
        return record
    except StaleRecordError as why:
        remove_state(files)
        say(f"removed a stale pid file ({why}): the pool's server is not running")
        return None


def remove_state(files: RunFiles) -> None:
    with contextlib.suppress(FileNotFoundError):
        files.state.unlink()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def spawn_server(
    config_file: Path, files: RunFiles, host: str, port: int, extra: list[str]
) -> tuple[subprocess.Popen[bytes], ServerRecord]:
    """Start `coe serve` for this experts.yaml, detached (its own session: the terminal's
    Ctrl-C and hang-up do not reach it), its output in server.log; record it in server.json."""
    files.folder.mkdir(parents=True, exist_ok=True)
    config = str(config_file.expanduser().resolve())
    cmd = [sys.executable, "-m", "coe.cli", "--config", config, "serve",
           "--host", host, "--port", str(port), *extra]  # fmt: skip
    with files.server_log.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        created = time.time()
    display_host = f"[{host}]" if ":" in host else host
    record = ServerRecord(
        pid=proc.pid,
        url=f"http://{display_host}:{port}",
        host=host,
        port=port,
        config=config,
        log=str(files.server_log),
        started_at=time.time(),
        process_start=created,
    )
    record.save(files)
    return proc, record


def stop_server(record: ServerRecord, deadline_s: float) -> str:
    """SIGTERM the server (it shuts its engines down), SIGKILL it and what it started if any of
    them is still there after ``deadline_s``. Returns how it ended."""
    try:
        proc = server_process(record)
    except StaleRecordError as why:
        return f"not running ({why})"
    # Collected first: once the server is gone, its engine processes are no longer its children.
    family = [proc, *proc.children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=deadline_s)
    if not alive:
        return "stopped"
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return f"killed after {deadline_s:.0f} s ({len(alive)} process(es) did not stop on SIGTERM)"


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, progress bars' carriage returns and colours removed."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    rows = [_ANSI.sub("", r.split("\r")[-1]).rstrip() for r in text.splitlines()]
    return "\n".join([r for r in rows if r][-lines:])


def last_line(path: Path) -> str:
    return log_tail(path, 1)
