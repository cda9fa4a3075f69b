"""Every prompt strategy by name: the one place a new strategy is added.

experts.yaml's schema (coe.config, a lower layer) takes a category's ``strategy`` as any
string; the names are checked here, against this table, with the same kind of message.
"""

from __future__ import annotations

from coe.config import ConfigError, PoolConfig
from coe.prompts.base import PromptStrategy
from coe.prompts.expert_prompting import ExpertPrompting
from coe.prompts.mixture_of_prompts import MixtureOfPromptsStrategy
from coe.prompts.none import NoShaping

STRATEGIES: dict[str, type[PromptStrategy]] = {
    cls.name: cls
    for cls in (
        NoShaping,
        ExpertPrompting,
        MixtureOfPromptsStrategy,
    )
}


def unknown_strategies(config: PoolConfig) -> list[str]:
    """One problem line per category whose strategy is not in the table."""
    known = ", ".join(STRATEGIES)
    return [
        f"categories[{i}].strategy: '{c.strategy}' is not a known strategy (known: {known})"
        for i, c in enumerate(config.categories)
        if c.strategy not in STRATEGIES
    ]


def check_strategy_names(config: PoolConfig) -> None:
    """Raises ConfigError (naming experts.yaml and each key path) for an unknown strategy."""
    problems = unknown_strategies(config)
    if problems:
        raise ConfigError(config.source or "experts.yaml", problems)
