"""Rendering prompts: Gemma's template (no system role) and the Q/A format for base models."""

from __future__ import annotations

from pathlib import Path

import pytest

from coe.engines.render import render_qa, render_text, render_token_ids
from coe.types import Message, Prompt


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_gemma_template_folds_system_into_first_user_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = Prompt(
        messages=(
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Message("user", "Bye"),
        )
    )
    assert render_text(tokenizer, prompt) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_bos_exactly_once_in_both_formats(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for fmt in ("chat", "qa"):
        ids = render_token_ids(tokenizer, Prompt((Message("user", "Hi"),), format=fmt))
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1, fmt


def test_qa_transcript() -> None:
    text = render_qa(
        [
            Message("system", "Answer briefly."),
            Message("user", "2+2?"),
            Message("assistant", "4"),
            Message("user", " And 3+3? "),
        ]
    )
    assert text == "Answer briefly.\n\nQuestion: 2+2?\nAnswer: 4\nQuestion: And 3+3?\nAnswer:"
