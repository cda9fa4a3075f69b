"""Where coe keeps what it builds: prepared models, logs. One place, overridable with COE_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def coe_home() -> Path:
    return Path(os.environ.get("COE_HOME") or Path.home() / ".cache" / "coe").expanduser()


def models_dir() -> Path:
    return coe_home() / "models"
