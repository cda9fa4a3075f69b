"""The orchestrator: every routing decision, sticky sessions, prompt shaping and generation.

- orchestrator.py: the Orchestrator (decide, prepare, stream, chat);
- decisions.py: the decisions no router makes (caller's expert or category, fallback, session);
- sessions.py: a conversation's expert across turns, kept in the store;
- prompting.py: the final prompt and sampling an expert gets;
- generation.py: deadlines on a token stream, fallback experts before the first token;
- recording.py: each request's record in the request log (coe.requestlog).
"""

from coe.orchestrator.decisions import (
    AUTO,
    CATEGORY_PREFIX,
    How,
    UnknownExpertError,
    UnknownModelError,
    model_names,
    named_expert,
)
from coe.orchestrator.orchestrator import ChatResult, Orchestrator, Plan
from coe.orchestrator.prompting import to_messages, with_shaping
from coe.orchestrator.recording import Origin, RequestTrace
from coe.types import RouteDecision

__all__ = [
    "AUTO",
    "CATEGORY_PREFIX",
    "ChatResult",
    "How",
    "Orchestrator",
    "Origin",
    "Plan",
    "RequestTrace",
    "RouteDecision",
    "UnknownExpertError",
    "UnknownModelError",
    "model_names",
    "named_expert",
    "to_messages",
    "with_shaping",
]
