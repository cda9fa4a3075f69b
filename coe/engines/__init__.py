"""Expert backends: the Engine protocol, in-process vLLM, and remote OpenAI-compatible servers."""

from coe.engines.base import Engine, EngineError

__all__ = ["Engine", "EngineError"]
