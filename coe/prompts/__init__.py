"""Prompt shaping: rendering messages into model input, and (later) per-category strategies."""
