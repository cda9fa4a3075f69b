"""`coe router fit --finetune` on the real encoder: a small, seeded fine-tune end to end, its
int8 ONNX encoder shipped in the router folder, the follow-up detector, and reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coe.router.artifact import load_artifact

from .conftest import coe

CODING = [
    "Write a Python function that reverses a linked list",
    "my bash loop breaks on file names with spaces, fix it",
    "Traceback (most recent call last): KeyError: 'user_id' -- what is wrong with my dict code",
    "SQL query for the top 5 customers by total order value",
    "convert this JavaScript callback code to async/await",
    "why does my C program segfault when I free the pointer twice",
    "regex that matches ISO dates like 2024-03-09",
    "Dockerfile for a Flask app with gunicorn",
    "write unit tests for a function that parses CSV rows",
    "implement binary search in Rust",
    "Wie schreibe ich eine Schleife in Java, die rückwärts zählt?",
    "how do I read a JSON file in Go and print one field",
    "refactor this class so the database access is injected",
    "git command to undo my last commit but keep the changes",
]
MATH = [
    "integral of x sin x",
    "What is the probability of rolling two sixes in five throws of a die?",
    "solve 3x + 7 = 22",
    "prove that the square root of 2 is irrational",
    "derivative of x^x",
    "find the eigenvalues of the matrix [[2, 1], [1, 2]]",
    "is 1001 a prime number",
    "A loan of 10000 at 5% a year compounded monthly: what is owed after 3 years?",
    "sum of the first 100 odd numbers",
    "¿Cuál es el área de un círculo de radio 3?",
    "how many ways can 5 people sit around a round table",
    "limit of sin(x)/x as x goes to 0",
    "variance of 3, 4, 4, 9, 30",
    "solve the system x + y = 10, x - y = 2",
]
WRITING = [
    "Write a haiku about the first frost",
    "a short poem for my grandma's 90th birthday",
    "make this e-mail sound more polite: send me the report now",
    "Write a product description for a handmade walnut cutting board",
    "a wedding toast for my sister, funny and under two minutes",
    "slogan for a small bakery",
    "Écris un petit poème sur la pluie à Paris",
    "write a cover letter opening for a junior data analyst job",
    "a bedtime story about a dragon who is afraid of the dark",
    "rewrite this paragraph so it sounds confident",
    "lyrics for a country song about leaving a small town",
    "an out-of-office reply that is friendly but promises nothing",
    "a limerick about a cat that hates its new litter box",
    "a two-sentence horror story set in a supermarket",
]
FOLLOWUPS = [
    "now make it shorter",
    "why?",
    "and in French?",
    "explain step 2 again",
    "add comments",
    "try again",
    "that's wrong",
    "continue",
    "put it in a table",
    "more formal please",
    "what about n = 0",
    "are you sure?",
]


def sheet(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(f"<<<PROMPT>>>\n{p}\n" for p in prompts))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("finetune")
    data = work / "data"
    data.mkdir()
    sheet(data / "coding.txt", CODING)
    sheet(data / "math.txt", MATH)
    sheet(data / "writing.txt", WRITING)
    sheet(work / "followup.txt", FOLLOWUPS)
    out = work / "router"
    args = ["router", "fit", str(data), "--finetune", "--epochs", "4", "--heldout-fraction", "0.3"]
    run = coe(*args, "--followups", str(work / "followup.txt"), "--out", str(out), timeout=900)
    assert run.returncode == 0, run.stderr
    assert "held-out accuracy" in run.stdout
    return work, out


def test_the_fine_tuned_router_ships_its_encoder_without_pickle(fitted) -> None:
    _, out = fitted
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {
        "router.json",
        "weights.npz",
        "encoder/model.int8.onnx",
        "encoder/tokenizer.json",
    } <= files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin", ".safetensors"))], files
    assert (out / "encoder" / "model.int8.onnx").stat().st_size < 30 * 2**20
    meta = json.loads((out / "router.json").read_text())
    assert meta["embedder"]["model"] == "encoder" and meta["embedder"]["backend"] == "onnx-int8"
    assert (
        meta["metrics"]["heldout_n"] > 0 and "heldout_expected_calibration_error" in meta["metrics"]
    )
    assert meta["training"]["finetune"]["seed"] == 0
    with np.load(out / "weights.npz", allow_pickle=False) as npz:
        assert {"coef", "intercept", "followup_coef", "followup_intercept"} <= set(npz.files)


def test_the_fine_tuned_router_routes_prompts_and_conversations(fitted) -> None:
    work, out = fitted
    routed = coe(
        "route", "--json", "--router", str(out), "Write a Python function that sorts a dict"
    )
    assert routed.returncode == 0, routed.stderr
    assert json.loads(routed.stdout)["category"] == "coding"
    opened = [
        {"role": "user", "content": "a short poem about autumn leaves"},
        {"role": "assistant", "content": "Leaves fall ..."},
    ]
    follow = work / "follow.json"
    follow.write_text(json.dumps([*opened, {"role": "user", "content": "now make it shorter"}]))
    run = coe("route", "--json", "--router", str(out), "--messages", str(follow))
    assert run.returncode == 0, run.stderr
    decision = json.loads(run.stdout)
    assert decision["category"] == "writing" and decision["continues"] is True


def test_the_same_seed_gives_the_same_router(fitted) -> None:
    work, out = fitted
    again = work / "again"
    args = ["router", "fit", str(work / "data"), "--finetune", "--epochs", "4"]
    run = coe(*args, "--heldout-fraction", "0.3", "--followups", str(work / "followup.txt"),
              "--out", str(again), timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr
    first, second = load_artifact(out), load_artifact(again)
    np.testing.assert_allclose(
        first.classifier.to_arrays()["coef"], second.classifier.to_arrays()["coef"]
    )
    assert first.embedder["fingerprint"] == second.embedder["fingerprint"]
    assert first.threshold == second.threshold
