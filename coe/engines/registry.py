"""The engine kinds an expert entry's `engine:` key can name.

Adding a kind takes one module in coe/engines (its Engine, its option model and an EngineKind
class, as vllm_local.py and remote.py have) and one line in ENGINE_KINDS; experts.yaml accepts the
kind's keys at once.
"""

from __future__ import annotations

from coe.engines.base import EngineKind
from coe.engines.remote import RemoteKind
from coe.engines.vllm_local import VllmKind

ENGINE_KINDS: dict[str, type[EngineKind]] = {
    "vllm": VllmKind,
    "remote": RemoteKind,
}

# The kind of an expert entry that has no `engine:` key.
DEFAULT_ENGINE_KIND = "vllm"


def engine_kind(name: str) -> type[EngineKind]:
    """The kind registered under ``name`` (coe.config has already refused unknown names)."""
    return ENGINE_KINDS[name]
