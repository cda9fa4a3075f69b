"""The legacy OpenAI completions API (POST /v1/completions): text in, text out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coe.gateway.schema import INT64_MAX, StreamOptions, UsageInfo

MAX_PROMPTS = 8


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="`auto` routes; an expert's name skips routing; `auto:CATEGORY` uses the "
        "category's expert."
    )
    # Each prompt is sent as one user message (token ids are refused: check_supported).
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"text, or up to {MAX_PROMPTS} texts (not streamed)"
    )
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    echo: bool = False
    user: str | None = None
    # Refused with a 400 naming them unless neutral (check_supported).
    best_of: int | None = Field(None, ge=1, le=20)
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)  # type: ignore[arg-type]

    def check_supported(self) -> tuple[str, str] | None:
        """(param, why) for the first field coe cannot honour, else None."""
        if isinstance(self.prompt, list):
            if not self.prompt:
                return "prompt", "prompt: send at least one text"
            if not all(isinstance(p, str) for p in self.prompt):
                return "prompt", "token ids are not supported; send the prompt as text"
            if len(self.prompt) > MAX_PROMPTS:
                return "prompt", f"at most {MAX_PROMPTS} prompts per request"
            if self.stream and len(self.prompt) > 1:
                return "prompt", "a streamed request takes one prompt"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported; leave it out"
        if self.logprobs:
            return "logprobs", "log probabilities are not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported; leave it out or send 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="The expert that answered.")
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
