"""One chat request as the gateway sees it, and the response headers that report its decision."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from coe.gateway.auth import Client
from coe.gateway.schema import ChatCompletionRequest
from coe.types import Message, RouteDecision

SESSION_HEADER = "x-coe-session"
CACHE_CONTROL_HEADER = "x-coe-cache-control"
# `coe ask` / `coe chat` talking to a running pool send "cli": the request log then tells
# their requests from other clients'. Any other value is the gateway's own.
FRONT_END_HEADER = "x-coe-front-end"


@dataclass
class Call:
    request: ChatCompletionRequest
    client: Client
    session: str | None = None
    cache_control: str | None = None
    front_end: str | None = None  # the x-coe-front-end header
    started: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.messages: list[Message] = self.request.to_messages()


def decision_headers(decision: RouteDecision, cache: str) -> dict[str, str]:
    headers = {"x-coe-expert": decision.expert, "x-coe-cache": cache}
    if decision.category is not None:
        headers["x-coe-category"] = decision.category
    if decision.confidence is not None:
        headers["x-coe-confidence"] = f"{decision.confidence:.4f}"
    if decision.fell_back:
        headers["x-coe-fallback"] = "1"  # the router was not sure: the fallback category
    if decision.strategy != "none":
        headers["x-coe-strategy"] = decision.strategy
    return headers
