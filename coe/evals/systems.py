"""The systems a benchmark measures, all answered through the orchestrator (no HTTP):

- ``auto``: the composed system: the router picks the expert, the category's prompt strategy
  applies; later turns stay with the first turn's expert, as the gateway's sessions do;
- ``<expert>``: one expert alone;
- ``random``: an expert drawn uniformly per question (seeded by the question, so reruns agree);
- ``oracle``: for each question, the expert that scored best on its category in an earlier run
  (``coe eval scores`` writes the table; pass it with ``--oracle-scores``).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coe.config import PoolConfig
from coe.errors import BadRequestError
from coe.orchestrator import Orchestrator, to_messages
from coe.types import RouteDecision

AUTO, RANDOM, ORACLE = "auto", "random", "oracle"
BASELINES = (AUTO, RANDOM, ORACLE)
ERROR_ANSWER = "$ERROR$"  # what FastChat and Arena-Hard write for an answer that failed


class SystemSpecError(BadRequestError):
    pass


@dataclass(frozen=True)
class System:
    name: str
    oracle_map: dict[str, str] = field(default_factory=dict)  # category -> expert (oracle only)

    def check_covers(self, categories: set[str]) -> None:
        """An oracle must know a best expert for every category it will be asked about."""
        missing = sorted(categories - set(self.oracle_map)) if self.name == ORACLE else []
        if missing:
            raise SystemSpecError(
                f"--oracle-scores has no score for categories {', '.join(missing)}: score "
                "every expert on this benchmark first (`coe eval scores RUN --out FILE`)"
            )


def resolve_systems(
    names: list[str], config: PoolConfig, oracle_scores: Path | None = None
) -> list[System]:
    unknown = [n for n in names if n not in BASELINES and n not in config.expert_names]
    if unknown:
        raise SystemSpecError(
            f"unknown system(s) {', '.join(unknown)}: use auto, random, oracle or an expert "
            f"({', '.join(config.expert_names)})"
        )
    systems = []
    for name in dict.fromkeys(names):
        if name != ORACLE:
            systems.append(System(name))
            continue
        if oracle_scores is None:
            raise SystemSpecError(
                "--system oracle needs --oracle-scores FILE (from `coe eval scores RUN`)"
            )
        systems.append(System(name, oracle_map(oracle_scores, config)))
    return systems


def oracle_map(path: Path, config: PoolConfig) -> dict[str, str]:
    """category -> the expert with the best score on it, from a ``coe eval scores`` file."""
    from coe.router.mapping import MappingError, load_scores

    try:
        table = load_scores(path)
    except MappingError as exc:
        raise SystemSpecError(str(exc)) from None
    foreign = [e for e in table.scores if e not in config.expert_names]
    if foreign:
        raise SystemSpecError(f"{path}: experts not in the pool: {', '.join(foreign)}")
    best: dict[str, str] = {}
    for category in table.categories:
        scored = [(per[category], e) for e, per in table.scores.items() if category in per]
        best[category] = max(scored)[1]
    return best


@dataclass
class Turn:
    """One request's answer and what it cost."""

    text: str
    decision: RouteDecision
    record: dict[str, Any]


class Answerer:
    """Answers one system's turns with the pool."""

    def __init__(self, orchestrator: Orchestrator, system: System):
        self.orch = orchestrator
        self.system = system

    def _first_decision(
        self, messages: list[dict[str, str]], key: str, category: str
    ) -> RouteDecision:
        """The system's pick for a conversation's first turn; the orchestrator decides."""
        name = self.system.name
        if name == AUTO:
            return self.orch.route(to_messages(messages))
        if name == RANDOM:
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
            return self.orch.pick(random.Random(seed).choice(self.orch.config.expert_names))
        if name == ORACLE:
            expert = self.system.oracle_map.get(category)
            if expert is None:
                raise SystemSpecError(
                    f"oracle: the scores file has no score for category {category!r}"
                )
            # The category's prompt strategy applies, as it would have for a routed turn.
            return self.orch.pick(
                expert, category=category, reason=f"oracle: best expert on {category}"
            )
        return self.orch.pick(name)

    async def answer(
        self,
        messages: list[dict[str, str]],
        *,
        key: str,
        category: str,
        decision: RouteDecision | None,
        temperature: float,
        max_tokens: int,
    ) -> Turn:
        """One request. ``decision`` pins the expert (a later turn of a conversation); without
        it the system decides. A prompt the expert cannot take is recorded as an error answer;
        an engine failure propagates, so that the item is retried on the next run."""
        from coe.engines.vllm_local import PromptTooLongError

        if decision is None:
            decision = self._first_decision(messages, key, category)
        t0 = time.perf_counter()
        try:
            result = await self.orch.chat(
                messages, decision=decision, temperature=temperature, top_p=1.0,
                max_tokens=max_tokens,
            )  # fmt: skip
        except PromptTooLongError as exc:
            record = _record(decision, time.perf_counter() - t0, 0, 0, self.orch)
            record["error"] = str(exc)
            return Turn(ERROR_ANSWER, decision, record)
        d = result.decision
        record = _record(
            d, result.latency_s, result.usage.prompt_tokens, result.usage.completion_tokens,
            self.orch,
        )  # fmt: skip
        return Turn(result.text, d, record)


def _record(
    decision: RouteDecision,
    latency_s: float,
    prompt_tokens: int,
    completion_tokens: int,
    orch: Orchestrator,
) -> dict[str, Any]:
    """What one request cost, and who answered it."""
    return {
        "expert": decision.expert,
        "category": decision.category,
        "confidence": decision.confidence,
        "strategy": decision.strategy,
        "params": orch.config.expert(decision.expert).params,
        "latency_s": round(latency_s, 4),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
