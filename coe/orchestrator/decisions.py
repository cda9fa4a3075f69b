"""How a RouteDecision is made when no router makes it: the caller names an expert or a
category, the pool falls back, a conversation stays with its expert. Every front end builds its
decisions here (the router builds its own), so a decision means the same wherever it was made.

The names a caller may ask for ("models", in the gateway's words): ``auto`` routes,
an expert's name skips routing, ``auto:CATEGORY`` takes the category's expert.
"""

from __future__ import annotations

from typing import Literal

from coe.config import PoolConfig
from coe.errors import BadRequestError
from coe.types import RouteDecision

AUTO = "auto"
CATEGORY_PREFIX = "auto:"

# How the expert was chosen: the gateway's metrics label, and what a log line says.
How = Literal["caller", "category", "session", "router", "fallback"]

CALLER_REASON = "expert chosen by the caller"


class UnknownExpertError(BadRequestError, KeyError):
    http_status = 404

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown expert {self.name!r}; defined experts: {', '.join(self.known)}"


class UnknownModelError(BadRequestError, KeyError):
    """A model name that is neither ``auto``, an expert nor ``auto:`` and a category."""

    http_status = 404

    def __init__(self, model: str, known: list[str]):
        self.model = model
        self.known = known
        super().__init__(model)

    def __str__(self) -> str:
        return f"The model {self.model!r} does not exist. Available: {', '.join(self.known)}"


def model_names(config: PoolConfig) -> list[str]:
    """Every name a caller may ask for: auto, each expert, auto:CATEGORY for each category."""
    return [AUTO, *config.expert_names, *(CATEGORY_PREFIX + c for c in config.category_names)]


def named_expert(config: PoolConfig, model: str) -> str | None:
    """The expert a model name fixes without routing (an expert, auto:CATEGORY), else None."""
    if model in config.expert_names:
        return model
    name = model.removeprefix(CATEGORY_PREFIX)
    if model.startswith(CATEGORY_PREFIX) and name in config.category_names:
        return config.category(name).expert
    return None


def chosen_expert(
    config: PoolConfig,
    expert: str,
    *,
    category: str | None = None,
    reason: str = CALLER_REASON,
    latency_s: float = 0.0,
) -> RouteDecision:
    """An expert picked without the router (by the caller, an eval's baseline). A ``category``
    the pool knows brings its prompt strategy along; an unknown one is dropped."""
    if expert not in config.expert_names:
        raise UnknownExpertError(expert, config.expert_names)
    return RouteDecision(
        expert=expert,
        category=category if category in config.category_names else None,
        confidence=None,
        fell_back=False,
        reason=reason,
        latency_s=latency_s,
    )


def chosen_category(config: PoolConfig, model: str) -> RouteDecision:
    """``auto:CATEGORY``: the category's expert, with the category's prompt strategy."""
    name = model.removeprefix(CATEGORY_PREFIX)
    if not model.startswith(CATEGORY_PREFIX) or name not in config.category_names:
        raise UnknownModelError(model, model_names(config))
    return RouteDecision(
        expert=config.category(name).expert,
        category=name,
        confidence=None,
        fell_back=False,
        reason="category chosen by the caller",
    )


def fallback(config: PoolConfig, latency_s: float = 0.0) -> RouteDecision:
    """A pool without a router sends everything to the fallback category's expert."""
    return RouteDecision(
        expert=config.fallback_expert,
        category=config.router.fallback,
        confidence=None,
        fell_back=True,
        reason="no router configured: fallback category",
        latency_s=latency_s,
    )


def continued(expert: str, category: str | None) -> RouteDecision:
    """A later turn of a conversation, kept with the expert that answered the earlier ones."""
    return RouteDecision(
        expert=expert,
        category=category,
        confidence=None,
        fell_back=False,
        reason="the conversation stays with the expert that answered it",
    )
