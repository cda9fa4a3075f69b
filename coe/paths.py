"""Where coe keeps what it builds: prepared models, embedders, logs. One place: COE_HOME."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def coe_home() -> Path:
    return Path(os.environ.get("COE_HOME") or Path.home() / ".cache" / "coe").expanduser()


def models_dir() -> Path:
    return coe_home() / "models"


def embedders_dir() -> Path:
    return coe_home() / "embedders"


def logs_dir() -> Path:
    return coe_home() / "logs"


REQUEST_LOG_ENV = "COE_LOG_DB"


def request_log_default() -> Path:
    """The request log every pool writes unless its experts.yaml names another (log.path):
    $COE_LOG_DB, else $COE_HOME/logs/requests.sqlite."""
    given = os.environ.get(REQUEST_LOG_ENV)
    return Path(given).expanduser() if given else logs_dir() / "requests.sqlite"


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise one build across processes (a test run and `make chat` at once)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def evaldata_dir() -> Path:
    """The MT-Bench / Arena-Hard copies: $COE_EVALDATA, else ../shared/evaldata beside the repo."""
    given = os.environ.get("COE_EVALDATA")
    if given:
        return Path(given).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "evaldata"


def arena_hard_questions() -> Path:
    return evaldata_dir() / "arena_hard" / "v2.0" / "question.jsonl"


def mt_bench_questions() -> Path:
    return evaldata_dir() / "mt_bench" / "question.jsonl"
