"""`coe route`, `coe router fit|eval` and `coe bench router` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from coe.paths import arena_hard_questions, mt_bench_questions
from coe.router.data import read_labelled

from .conftest import coe

ROOT = Path(__file__).resolve().parent.parent


def test_route_json_names_coding() -> None:
    run = coe("route", "--json", "Write a Python function that merges two sorted lists")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["category"] == "coding" and out["expert"] == "coder"
    assert 0.0 <= out["confidence"] <= 1.0 and out["fell_back"] is False
    assert [a["category"] for a in out["alternatives"]] and out["latency_s"] > 0


def test_route_json_follows_a_conversation(tmp_path: Path) -> None:
    """A follow-up keeps the first turn's category; a new task gets its own."""
    opened = [
        {"role": "user", "content": "Write a Python function that merges two sorted lists"},
        {"role": "assistant", "content": "def merge(a, b): ..."},
    ]
    for last, category, continues in (
        ("now make it shorter", "coding", True),
        ("ok, different question: prove that √2 is irrational", "math", False),
    ):
        path = tmp_path / "conversation.json"
        path.write_text(json.dumps([*opened, {"role": "user", "content": last}]))
        run = coe("route", "--json", "--messages", str(path))
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert (out["category"], out["continues"]) == (category, continues), out


def test_route_refuses_a_broken_conversation(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"role": "robot", "content": "hi"}]')
    run = coe("route", "--messages", str(path))
    assert run.returncode == 2 and "role" in run.stderr and "bad.json" in run.stderr
    path.write_text("[{")
    run = coe("route", "--messages", str(path))
    assert run.returncode == 2 and "not JSON" in run.stderr
    run = coe("route", "--messages", str(path), "and a prompt")
    assert run.returncode == 2 and "not both" in run.stderr


def test_finetune_refuses_the_torch_backend(tmp_path: Path) -> None:
    run = coe(
        "router", "fit", str(ROOT / "routers/default/data"), "--finetune", "--backend", "torch",
        "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert run.returncode == 2 and "onnx-int8" in run.stderr
    assert not (tmp_path / "r").exists()


def test_router_eval_on_mt_bench(tmp_path: Path) -> None:
    png = tmp_path / "mt.png"
    run = coe("router", "eval", str(mt_bench_questions()), "--json", "--plot", str(png))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["n"] == 80
    assert set(out) >= {"accuracy", "macro_f1", "per_category", "coarse_accuracy", "ece"}
    assert len(out["per_category"]) == 8
    assert out["accuracy"] > 0.5  # a broken router would be near 1/8
    assert out["coarse_accuracy"] >= out["accuracy"]
    coverage = out["coverage"]
    assert coverage[0]["threshold"] == 0.0 and coverage[0]["coverage"] == 1.0
    assert [c["coverage"] for c in coverage] == sorted(
        (c["coverage"] for c in coverage), reverse=True
    )
    assert png.stat().st_size > 1000
    assert (tmp_path / "mt-coverage.png").stat().st_size > 1000


def test_router_eval_on_arena_hard_reports_coarse_and_expert_accuracy() -> None:
    run = coe("router", "eval", str(arena_hard_questions()), "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["n"] == 750
    assert set(out) >= {"accuracy", "coarse_accuracy", "expert_accuracy", "ece"}
    assert set(out["per_category"]) == {"coding", "math", "writing"}
    assert 0.0 <= out["ece"] <= 1.0 and out["expert_accuracy"] is not None


def test_router_fit_then_route_with_it(tmp_path: Path) -> None:
    rows = [
        {"prompt": r.prompt, "category": r.category}
        for r in read_labelled(ROOT / "routers/default/data")
        if len(r.prompt) < 300 and r.lang == "en"
    ]
    picked = [r for r in rows if r["category"] == "coding"][:30]
    picked += [r for r in rows if r["category"] == "writing"][:30]
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in picked) + "\n")
    out = tmp_path / "router"
    fit = coe("router", "fit", str(data), "--out", str(out))
    assert fit.returncode == 0, fit.stderr
    assert "cross-validated accuracy" in fit.stdout
    assert (out / "router.json").exists() and (out / "weights.npz").exists()
    routed = coe("route", "--json", "--router", str(out), "Fix the off-by-one error in my loop")
    assert routed.returncode == 0, routed.stderr
    assert json.loads(routed.stdout)["category"] == "coding"


def test_broken_data_and_router_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    run = coe("router", "fit", str(bad), "--out", str(tmp_path / "r"))
    assert run.returncode == 2 and "bad.jsonl:1" in run.stderr and "category" in run.stderr
    run = coe("route", "--router", str(tmp_path / "nowhere"), "hello")
    assert run.returncode == 2 and "coe router fit" in run.stderr


def test_bench_router_json(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": f"Write a poem number {i}", "category": "writing"})
                  for i in range(40)) + "\n"
    )  # fmt: skip
    run = coe("bench", "router", "--prompts", str(prompts), "--repeats", "5", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    for path in ("router", "reference"):
        figures = out[path]
        assert figures["long_p50_ms"] > 0 and figures["batched_prompts_per_s"] > 0
    assert out["reference"]["backend"] == "torch" and out["router"]["backend"] == "onnx-int8"
    assert out["prompts"] == 40 and set(out["speedup"]) == {"short_p50", "long_p50", "batched"}
