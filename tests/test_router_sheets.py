"""Prompt sheets (hand-written training data) and the held-out split: format, errors, stability."""

from __future__ import annotations

from pathlib import Path

import pytest

from coe.router.data import DataError, LabelledPrompt, is_heldout, read_labelled, split_heldout
from coe.router.sheets import SheetError, read_sheet, shape_counts


def test_a_sheet_keeps_line_breaks_language_and_tags(tmp_path: Path) -> None:
    sheet = tmp_path / "coding.txt"
    sheet.write_text(
        "<<<PROMPT lang=de tags=long,pasted>>>\n\nTraceback:\n  File x\n\nwas ist da los?\n\n"
        "<<<PROMPT>>>\nfix my regex\n"
    )
    first, second = read_sheet(sheet)
    assert first.prompt == "Traceback:\n  File x\n\nwas ist da los?"
    assert (first.category, first.lang, first.tags) == ("coding", "de", ("long", "pasted"))
    assert (second.prompt, second.lang, second.tags) == ("fix my regex", "en", ())
    assert shape_counts([first, second])["not English"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stray text\n<<<PROMPT>>>\nx\n", "before the first"),
        ("<<<PROMPT lang=en>>>\n\n\n<<<PROMPT>>>\nx\n", "empty prompt"),
        ("<<<PROMPT lang=en\nx\n", "malformed header"),
        ("<<<PROMPT who=me>>>\nx\n", "unknown header keys"),
    ],
)
def test_broken_sheets_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    sheet = tmp_path / "math.txt"
    sheet.write_text(text)
    with pytest.raises(SheetError, match=message) as caught:
        read_sheet(sheet)
    assert "math.txt:" in str(caught.value)


def test_a_folder_of_sheets_reads_as_labelled_data(tmp_path: Path) -> None:
    (tmp_path / "math.txt").write_text("<<<PROMPT>>>\nintegral of x\n")
    (tmp_path / "writing.txt").write_text("<<<PROMPT lang=fr>>>\nun poème\n")
    rows = read_labelled(tmp_path)
    assert [(r.category, r.lang) for r in rows] == [("math", "en"), ("writing", "fr")]
    one = read_labelled(tmp_path / "writing.txt")  # one sheet on its own: its name is the label
    assert [(r.prompt, r.category, r.lang) for r in one] == [("un poème", "writing", "fr")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \*\.txt prompt sheets"):
        read_labelled(empty)


def test_the_heldout_split_is_stable_and_near_its_fraction() -> None:
    prompts = [f"prompt number {i}" for i in range(4000)]
    held = [p for p in prompts if is_heldout(p, 0.15)]
    assert 0.13 < len(held) / len(prompts) < 0.17
    # A prompt keeps its side whatever else is in the data.
    assert [p for p in prompts[:100] if is_heldout(p, 0.15)] == [
        p for p in held if int(p.split()[-1]) < 100
    ]
    train, test = split_heldout([LabelledPrompt(p, "math") for p in prompts], 0.15)
    assert [r.prompt for r in test] == held
    assert len(train) == len(prompts) - len(held)


def test_a_heldout_split_without_a_category_is_refused_before_training(tmp_path: Path) -> None:
    from coe.router.finetune import FinetuneSettings
    from coe.router.train import fit_finetuned_router

    rows = [LabelledPrompt(f"math prompt {i}", "math") for i in range(40)]
    rows.append(LabelledPrompt("the only writing prompt", "writing"))
    with pytest.raises(ValueError, match="held-out split has no prompts of writing"):
        fit_finetuned_router(
            rows,
            tmp_path / "r",
            model="sentence-transformers/all-MiniLM-L6-v2",
            max_seq_length=64,
            tail_tokens=16,
            heldout_fraction=0.01,
            settings=FinetuneSettings(),
        )
    assert not (tmp_path / "r").exists()
