"""coe: a composition-of-experts orchestrator. Routes each prompt to the right expert LLM."""

__version__ = "0.1.0"
