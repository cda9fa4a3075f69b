"""Expert backends: the Engine protocol, in-process vLLM, and remote OpenAI-compatible servers."""

from coe.engines.base import (
    Chunk,
    Completion,
    Engine,
    EngineError,
    Message,
    Prompt,
    SamplingParams,
    Usage,
)

__all__ = [
    "Chunk",
    "Completion",
    "Engine",
    "EngineError",
    "Message",
    "Prompt",
    "SamplingParams",
    "Usage",
]
