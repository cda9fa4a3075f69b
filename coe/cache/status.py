"""A live view of the weight cache for other processes: `coe experts` reads what a running
`coe chat` / `coe serve` last wrote (tier, bytes, hit counts per checkpoint)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coe.paths import coe_home


def _run_dir() -> Path:
    return coe_home() / "run"


class StatusFile:
    """Rewritten (atomically, at most once a second unless forced) by the serving process."""

    def __init__(self, config_source: Path | None, min_interval_s: float = 1.0):
        self.config = str(config_source) if config_source else None
        self.path = _run_dir() / f"cache-{os.getpid()}.json"
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def write(self, rows: Callable[[], list[dict[str, Any]]], force: bool = False) -> None:
        """`rows` is called only when the file is due: requests notify on every completion."""
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        body = {
            "pid": os.getpid(),
            "config": self.config,
            "updated": time.time(),
            "experts": rows(),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            tmp.replace(self.path)
        except OSError:
            pass  # a status view must never break serving

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def read_live(config_source: Path | None) -> dict[str, Any] | None:
    """The newest status written by a live process serving this experts.yaml, if any."""
    newest: dict[str, Any] | None = None
    for file in _run_dir().glob("cache-*.json"):
        try:
            body = json.loads(file.read_text())
            os.kill(int(body["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue
        if config_source is not None and body.get("config") != str(config_source):
            continue
        if newest is None or body["updated"] > newest["updated"]:
            newest = body
    return newest
