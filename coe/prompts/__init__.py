"""Prompt shaping: the per-category strategies that turn a request into the expert's prompt.

``base`` (what a strategy is, and the Shaping it returns), ``registry`` (every strategy by name),
one module per strategy (``none``, ``expert_prompting``, ``mixture_of_prompts``) with their
machinery (``identity``, ``mixture``), and ``strategies`` (a pool's categories, shaped).
"""
