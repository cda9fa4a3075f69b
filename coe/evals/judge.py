"""The LLM judge: any litellm model, or an expert of the local pool, behind one call that adds a
concurrency limit, retries with backoff and a persistent cache (a rerun costs nothing).

``--judge`` takes a litellm model string (``openai/gpt-4.1``, ``hosted_vllm/Qwen/...`` with
``--judge-base-url``) or ``pool:<expert>`` to judge with an expert of the pool being evaluated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from coe.errors import UnavailableError
from coe.paths import coe_home

log = logging.getLogger(__name__)

POOL_PREFIX = "pool:"
# Statuses that a retry cannot fix: a malformed request, a bad key, an unknown model, a prompt
# longer than the judge's context.
PERMANENT_STATUS = {400, 401, 403, 404, 413, 422}
# Words in a 4xx that say the judge cannot take this one prompt (the others may pass).
PROMPT_REFUSED = ("context length", "context window", "maximum context", "too long",
                  "content policy", "content_policy", "content management")  # fmt: skip

# vLLM and OpenAI name the judge's context in a too-long error ("maximum context length is
# 4096", or vLLM 0.32's "cannot be greater than max_model_len=1024").
CONTEXT_LIMIT = re.compile(r"(?:maximum context length is|max_model_len=)\s*(\d+)")

# What a failure says about the run:
TRANSIENT = "transient"  # retry it (outage, rate limit, timeout)
PROMPT = "prompt"  # this prompt cannot be judged: recorded as FastChat records it ($ERROR$)
SETUP = "setup"  # the judge is misconfigured (key, model name, parameters): stop the run


class JudgeError(UnavailableError):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind

    @property
    def permanent(self) -> bool:
        return self.kind != TRANSIENT


def classify(status: int | None, message: str, exc_name: str = "") -> str:
    """A judge failure's kind from its HTTP status and message (litellm's or a server's)."""
    if status not in PERMANENT_STATUS:
        return TRANSIENT
    text = f"{exc_name} {message}".lower()
    if status == 413 or "contextwindowexceeded" in text or "contentpolicy" in text:
        return PROMPT
    return PROMPT if any(words in text for words in PROMPT_REFUSED) else SETUP


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


class JudgeBackend(Protocol):
    @property
    def name(self) -> str:
        """What identifies this judge in judgment records."""
        ...

    @property
    def cache_scope(self) -> str:
        """What identifies this judge in the cache key: its name and where it is served."""
        ...

    async def complete(
        self, messages: Sequence[ChatTurn], temperature: float, max_tokens: int
    ) -> str: ...


class LiteLLMJudge:
    """Any model litellm reaches: a hosted API, or an OpenAI-compatible server at ``base_url``."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None):
        self.model = model
        self.base_url = base_url
        self.api_key = api_key

    @property
    def name(self) -> str:
        return self.model

    @property
    def cache_scope(self) -> str:
        # Two servers may serve different models under one name.
        return f"{self.model}@{self.base_url}" if self.base_url else self.model

    async def complete(
        self, messages: Sequence[ChatTurn], temperature: float, max_tokens: int
    ) -> str:
        from coe.engines.remote import load_litellm

        litellm = load_litellm()
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": temperature,
            "max_tokens": max_tokens,
            "num_retries": 0,  # Judge retries, with its own backoff
        }
        if self.base_url:
            kwargs["api_base"] = self.base_url
            # A local server takes any key; the OpenAI client insists on one.
            kwargs["api_key"] = self.api_key or "none"
        elif self.api_key:
            kwargs["api_key"] = self.api_key
        try:
            response = await litellm.acompletion(**kwargs)
        except Exception as exc:  # litellm maps every provider's errors onto its own classes
            status = getattr(exc, "status_code", None)
            message = f"judge {self.model}: {type(exc).__name__}: {exc}"
            kind = classify(status, str(exc), type(exc).__name__)
            context = CONTEXT_LIMIT.search(str(exc))
            if kind != TRANSIENT and context and max_tokens >= int(context.group(1)):
                # Not this prompt: no prompt at all fits beside that many new tokens.
                message += f" (--judge-max-tokens {max_tokens} leaves no room for any prompt)"
                kind = SETUP
            raise JudgeError(message, kind) from exc
        return str(response.choices[0].message.content or "")


class PoolJudge:
    """An expert of the local pool as the judge (its engine is the pool's)."""

    def __init__(self, orchestrator: Any, expert: str):
        self.orchestrator = orchestrator
        self.expert = expert

    @property
    def name(self) -> str:
        model = self.orchestrator.config.expert(self.expert).model
        return f"{POOL_PREFIX}{self.expert}({model})"

    @property
    def cache_scope(self) -> str:
        return self.name

    async def complete(
        self, messages: Sequence[ChatTurn], temperature: float, max_tokens: int
    ) -> str:
        from coe.engines.base import EngineError

        try:
            result = await self.orchestrator.chat(
                [{"role": m.role, "content": m.content} for m in messages],
                expert=self.expert,
                temperature=temperature,
                max_tokens=max_tokens,
            )
        except EngineError as exc:
            kind = TRANSIENT if exc.retryable else SETUP
            raise JudgeError(f"judge {self.name}: {exc}", kind) from exc
        except ValueError as exc:  # the prompt does not fit the expert's max_model_len
            raise JudgeError(f"judge {self.name}: {exc}", PROMPT) from exc
        return result.text


class JudgmentCache:
    """Judge outputs by request, in SQLite (safe to share between runs and processes)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, text TEXT)")
        self._db.commit()
        self._lock = threading.Lock()

    @staticmethod
    def key(judge: str, messages: Sequence[ChatTurn], temperature: float, max_tokens: int) -> str:
        blob = json.dumps(
            [judge, [[m.role, m.content] for m in messages], temperature, max_tokens],
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT text FROM judgments WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, text: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?)", (key, text))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def default_cache_path() -> Path:
    return coe_home() / "eval" / "judgments.sqlite"


@dataclass
class JudgeStats:
    calls: int = 0  # requests sent to the judge model
    answered: int = 0  # of those, answered
    cached: int = 0  # answered from the cache
    retries: int = 0


class Judge:
    """A judge backend with a concurrency limit, retries with exponential backoff, and a cache."""

    def __init__(
        self,
        backend: JudgeBackend,
        cache: JudgmentCache | None = None,
        concurrency: int = 8,
        # Up to 6 retries, waits drawn up to 2, 4, ... 64 s: long enough to ride out a rate
        # limit window in an hour-long run.
        retries: int = 6,
        backoff_s: float = 2.0,
    ):
        if concurrency < 1:
            raise ValueError("judge concurrency must be at least 1")
        self.backend = backend
        self.cache = cache
        self.retries = retries
        self.backoff_s = backoff_s
        self.stats = JudgeStats()
        self._limit = asyncio.Semaphore(concurrency)

    @property
    def name(self) -> str:
        return self.backend.name

    async def complete(
        self, messages: Sequence[ChatTurn], temperature: float, max_tokens: int
    ) -> str:
        key = JudgmentCache.key(self.backend.cache_scope, messages, temperature, max_tokens)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats.cached += 1
            return hit
        async with self._limit:
            text = await self._call(messages, temperature, max_tokens)
        # An empty output (a reasoning judge out of tokens, a server hiccup) is recorded as
        # unparseable but not cached: another run, or the item redone, asks again.
        if self.cache is not None and text.strip():
            self.cache.put(key, text)
        return text

    async def _call(self, messages: Sequence[ChatTurn], temperature: float, max_tokens: int) -> str:
        for attempt in range(self.retries + 1):
            self.stats.calls += 1
            try:
                text = await self.backend.complete(messages, temperature, max_tokens)
                self.stats.answered += 1
                return text
            except JudgeError as exc:
                if exc.permanent:
                    raise
                if attempt == self.retries:
                    if not self.stats.answered:  # not once: a wrong URL or a server not up
                        raise JudgeError(
                            f"{exc} (the judge has not answered once: check --judge-base-url "
                            "and that its server is up)",
                            SETUP,
                        ) from exc
                    raise
                # Full jitter: concurrent judgments that failed together do not retry together.
                delay = random.uniform(0, self.backoff_s * 2**attempt)
                log.warning("%s; retry %d in %.1f s", exc, attempt + 1, delay)
                self.stats.retries += 1
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")
