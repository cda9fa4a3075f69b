"""`coe eval` end to end, as a user runs it: smoke runs (--limit 2) of both benchmarks with the
real vLLM engine (gemma-3-270m) as the systems and as the judge, then the report and the expert
scores. The small judge's verdicts are often unparseable; the report says how many."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from coe.evals.arena_hard import POINTS_AS_A
from coe.evals.data import read_jsonl

from .conftest import coe, pool_dict

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def workdir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("eval")
    # Room for an Arena-Hard prompt, its baseline's answer and ours in one judge prompt.
    pool = pool_dict(max_model_len=4096)
    for expert in pool["experts"]:
        expert["params"] = 268_098_176
    (root / "experts.yaml").write_text(yaml.safe_dump(pool))
    yield root


def _eval(workdir: Path, benchmark: str, *extra: str) -> tuple[int, str]:
    result = coe(
        "--config", str(workdir / "experts.yaml"), "eval", benchmark, "--limit", "2",
        "--system", "auto", "--system", "qa", "--judge", "pool:chatty",
        "--max-tokens", "48", "--judge-max-tokens", "48",
        "--judge-cache", str(workdir / "judgments.sqlite"),
        "--out", str(workdir / benchmark), *extra,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_mt_bench_smoke_run_then_a_free_rerun(workdir: Path) -> None:
    status, output = _eval(workdir, "mt-bench")
    assert status == 0, output
    assert "4 answers and 8 judgments to do" in output
    answers = list(read_jsonl(workdir / "mt-bench" / "answers.jsonl"))
    assert {(a["model_id"], a["question_id"]) for a in answers} == {
        ("auto", 81), ("auto", 82), ("qa", 81), ("qa", 82)
    }  # fmt: skip
    for a in answers:
        assert len(a["choices"][0]["turns"]) == 2 and all(a["choices"][0]["turns"])
        for request in a["requests"]:
            assert request["expert"] == "qa"  # auto: no router, so the fallback category's
            assert request["completion_tokens"] > 0 and request["latency_s"] > 0
            assert request["params"] == 268_098_176
    judgments = list(read_jsonl(workdir / "mt-bench" / "judgments.jsonl"))
    assert len(judgments) == 8
    assert {j["turn"] for j in judgments} == {1, 2}
    assert all(j["score"] == -1 or 1 <= j["score"] <= 10 for j in judgments)
    assert all(j["judge"][0].startswith("pool:chatty") for j in judgments)

    # Finished: the rerun starts no engine and asks no judge.
    status, output = _eval(workdir, "mt-bench")
    assert status == 0, output
    assert "0 answers and 0 judgments to do" in output
    assert "starting the expert engine" not in output
    assert len(list(read_jsonl(workdir / "mt-bench" / "judgments.jsonl"))) == 8


def test_arena_hard_smoke_run(workdir: Path) -> None:
    status, output = _eval(workdir, "arena-hard")
    assert status == 0, output
    records = list(read_jsonl(workdir / "arena-hard" / "judgments.jsonl"))
    assert len(records) == 4  # 2 questions x 2 systems
    for record in records:
        assert record["baseline"] == "o3-mini-2025-01-31"  # the first two are hard prompts
        assert len(record["games"]) == 2
        for game in record["games"]:
            assert game["judgment"] and (game["score"] is None or game["score"] in POINTS_AS_A)


def test_report_and_scores_of_the_smoke_runs(workdir: Path) -> None:
    runs = [str(workdir / "mt-bench"), str(workdir / "arena-hard")]
    out = workdir / "report"
    result = coe("eval", "report", *runs, "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("report.md", "report.json", "categories.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "categories.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"mt-bench", "arena-hard-v2.0"}
    mt = report["mt-bench"]["auto"]
    assert mt["requests"] == 4 and mt["avg_active_params"] == 268_098_176
    judgments = list(read_jsonl(Path(runs[0]) / "judgments.jsonl"))
    unrated = [j for j in judgments if j["model"] == "auto" and j["score"] == -1]
    assert mt["judgments"] == 4 and mt["unparseable"] == len(unrated)
    assert "Unparseable" in (out / "report.md").read_text()

    # The small judge's ratings are chance: score two copies of the run whose qa judgments are
    # set, so both outcomes are checked on every run. None rated: nothing to score, and it says
    # so. Some rated: the unparseable one is left out of the mean.
    unrated = _with_qa_scores(Path(runs[0]), workdir / "unrated", [-1, -1, -1, -1])
    result = _scores(workdir, unrated)
    assert result.returncode == 2 and "no rated answers for qa" in result.stderr, result.stderr
    rated = _with_qa_scores(Path(runs[0]), workdir / "rated", [4, 6, 8, -1])
    result = _scores(workdir, rated)
    assert result.returncode == 0, result.stderr
    table = json.loads((rated / "scores.json").read_text())
    assert table == {
        "benchmark": "mt-bench",
        "scores": {"qa": {"writing": 6.0}},
        "frequencies": {"writing": 2},
    }


def _with_qa_scores(run: Path, copy: Path, scores: list[int]) -> Path:
    """A copy of an MT-Bench run whose qa judgments (in file order) carry these ratings."""
    shutil.copytree(run, copy)
    rows = list(read_jsonl(copy / "judgments.jsonl"))
    qa = [row for row in rows if row["model"] == "qa"]
    assert len(qa) == len(scores)
    for row, score in zip(qa, scores, strict=True):
        row["score"] = score
    (copy / "judgments.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return copy


def _scores(workdir: Path, run: Path) -> subprocess.CompletedProcess[str]:
    return coe("--config", str(workdir / "experts.yaml"), "eval", "scores", str(run),
               "--out", str(run / "scores.json"))  # fmt: skip
