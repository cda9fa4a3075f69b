"""Prompt shaping: the per-category strategies that turn a request into the expert's prompt."""
