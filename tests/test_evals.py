"""coe eval without an engine: data loading, judge prompts and parsing, scoring against published
numbers and hand-made judgment sets, the judge's retries and cache, resumable runs, reports.
(The end-to-end run with the real engine as system and judge is tests/test_evals_engine.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from coe.evals import arena_hard, mt_bench
from coe.evals.data import (
    ArenaHardData,
    ArenaQuestion,
    EvalDataError,
    load_arena_hard,
    load_mt_bench,
    read_jsonl,
)
from coe.evals.judge import (
    PROMPT,
    SETUP,
    TRANSIENT,
    ChatTurn,
    Judge,
    JudgeError,
    JudgmentCache,
    classify,
)
from coe.evals.report import expert_scores, load_run, write_report
from coe.evals.run import (
    ArenaHardTask,
    MTBenchTask,
    RunError,
    RunFolder,
    cut_partial_line,
    execute,
    plan_run,
)
from coe.evals.systems import Answerer, System, Turn
from coe.paths import evaldata_dir
from coe.router.mapping import load_scores
from coe.types import RouteDecision

from .conftest import coe

PUBLISHED = evaldata_dir() / "mt_bench" / "model_judgment" / "gpt-4_single.jsonl"


# -- data ------------------------------------------------------------------------------------


def test_jsonl_keeps_a_line_separator_inside_a_prompt(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    rows = [{"uid": "a", "prompt": "one\u2028two"}, {"uid": "b", "prompt": "three"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert list(read_jsonl(path)) == rows
    assert len(load_arena_hard(version="v2.0").questions) == 750  # holds a U+2028


def test_benchmark_data_loads_with_baselines_and_judge_settings() -> None:
    mt = load_mt_bench()
    assert len(mt.questions) == 80 and all(len(q.turns) == 2 for q in mt.questions)
    assert {"single-v1", "single-math-v1-multi-turn"} <= set(mt.judge_prompts)
    v2 = load_arena_hard(version="v2.0")
    assert v2.settings["hard_prompt"].baseline == "o3-mini-2025-01-31"
    assert v2.settings["creative_writing"].baseline == "gemini-2.0-flash-001"
    # gemini's answers lack two uids, both hard prompts (whose baseline is o3-mini).
    assert all(v2.baseline_answer(q) is not None for q in v2.questions)
    v01 = load_arena_hard(version="v0.1")
    assert len(v01.questions) == 500 and v01.judge_max_tokens == 4096


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    result = coe("eval", "score", "mt-bench", "--judgments", str(PUBLISHED), "--data",
                 str(tmp_path))  # fmt: skip
    assert result.returncode == 2
    assert "MT-Bench data not found" in result.stderr and "COE_EVALDATA" in result.stderr


# -- MT-Bench --------------------------------------------------------------------------------


def test_published_mt_bench_scores_are_reproduced() -> None:
    result = coe("eval", "score", "mt-bench", "--judgments", str(PUBLISHED), "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert abs(scores["unify"]["overall"] - 8.7579) < 0.0005
    assert abs(scores["martian"]["overall"] - 8.3125) < 0.0005
    assert scores["unify"]["unparseable"] == 1  # its -1 is left out, as FastChat does
    assert set(scores["martian"]["categories"]) == {
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("judgment", "rating"),
    [
        ("Fine answer. Rating: [[8]]", 8.0),
        ("Rating: [[7.5]] and later [[2]]", 7.5),  # the first [[n]] counts
        ("Rating: [6]", 6.0),  # the backup pattern
        ("I would give it eight out of ten.", -1),
    ],
)
def test_rating_parse_follows_fastchat(judgment: str, rating: float) -> None:
    assert mt_bench.parse_rating(judgment) == rating


def test_judge_prompts_pick_the_reference_for_math_and_the_multi_turn_form() -> None:
    data = load_mt_bench()
    math_q = next(q for q in data.questions if q.category == "math")
    writing_q = next(q for q in data.questions if q.category == "writing")
    name, messages = mt_bench.judge_messages(data, math_q, ("A1", "A2"), 1)
    assert name == "single-math-v1"
    assert data.references[math_q.question_id][0] in messages[1].content
    assert "A1" in messages[1].content and messages[0].content == "You are a helpful assistant."
    name, messages = mt_bench.judge_messages(data, math_q, ("A1", "A2"), 2)
    assert name == "single-math-v1-multi-turn"
    assert data.references[math_q.question_id][1] in messages[1].content
    name, messages = mt_bench.judge_messages(data, writing_q, ("A1", "A2"), 2)
    assert name == "single-v1-multi-turn"
    assert writing_q.turns[1] in messages[1].content and "A2" in messages[1].content
    assert mt_bench.temperature_for("writing") == 0.7
    assert mt_bench.temperature_for("math") == 0.0


# -- Arena-Hard ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("judgment", "label"),
    [
        ("My final verdict is tie: [[A=B]]", "A=B"),
        ("first [[A>B]] then, on reflection, [[b>>a]]", "B>>A"),  # upper-cased, the last one
        ("Verdict: [A>B]", "A>B"),  # the second pattern
        ("no label here", None),
    ],
)
def test_verdict_parse_follows_upstream(judgment: str, label: str | None) -> None:
    patterns = load_arena_hard(version="v2.0").regex_patterns
    assert arena_hard.parse_verdict(judgment, patterns) == label


def _record(model: str, first: str | None, second: str | None, uid: str = "q") -> dict:
    return {
        "uid": uid, "category": "arena-hard-v0.1", "subcategory": "arena-hard-v0.1",
        "model": model, "baseline": "base", "games": [{"score": first}, {"score": second}],
    }  # fmt: skip


def test_all_ties_score_50_by_both_methods() -> None:
    records = [_record("m", "A=B", "A=B", str(i)) for i in range(20)]
    s = arena_hard.score_judgments(records)["m"]
    assert s["win_rate"]["score"] == 50.0
    assert s["bradley_terry"]["score"] == pytest.approx(50.0, abs=0.01)


def test_strong_wins_score_near_100_and_strong_losses_near_0() -> None:
    # The system is B in game 1 and A in game 2: a strong win is B>>A then A>>B.
    wins = arena_hard.score_judgments([_record("m", "B>>A", "A>>B", str(i)) for i in range(20)])
    assert wins["m"]["win_rate"]["score"] == 100.0
    assert wins["m"]["bradley_terry"]["score"] > 99
    losses = arena_hard.score_judgments([_record("m", "A>>B", "B>>A", str(i)) for i in range(20)])
    assert losses["m"]["win_rate"]["score"] == 0.0
    assert losses["m"]["bradley_terry"]["score"] < 1


def test_a_judge_that_favours_one_position_cancels_out() -> None:
    # Always "A is much better": the baseline wins game 1, the system wins game 2.
    records = [_record("m", "A>>B", "A>>B", str(i)) for i in range(10)]
    s = arena_hard.score_judgments(records)["m"]
    # v2.0 reports the mean of bootstrap means: 50 up to resampling noise.
    assert s["win_rate"]["score"] == pytest.approx(50.0, abs=3)
    assert s["win_rate"]["ci"][0] < 50 < s["win_rate"]["ci"][1]
    assert s["bradley_terry"]["score"] == pytest.approx(50.0, abs=0.01)


def test_strong_verdicts_weigh_three_and_missing_verdicts_are_counted() -> None:
    # One strong win (3 points, both games) against one slight loss (1 point each game).
    records = [_record("m", "B>>A", "A>>B", "1"), _record("m", "A>B", "B>A", "2")]
    points = [p for r in records for p in arena_hard.battle_points(r) or []]
    assert sum(points) / len(points) == 0.75  # 6 points of 8
    records.append(_record("m", None, "A>B", "3"))
    s = arena_hard.score_judgments(records)["m"]
    assert s["unparseable"] == 1 and s["judgments"] == 3
    assert s["win_rate"]["battles"] == 8


def test_v2_scores_each_arena_category_apart_with_hard_prompt_the_headline() -> None:
    def record(first: str, second: str, uid: str, arena: str, sub: str, baseline: str) -> dict:
        return {**_record("m", first, second, uid), "category": arena, "subcategory": sub,
                "baseline": baseline}  # fmt: skip

    hard = [record("B>>A", "A>>B", f"h{i}", "hard_prompt", "coding", "o3") for i in range(10)]
    creative = [
        record("A>>B", "B>>A", f"c{i}", "creative_writing", "creative_writing", "gemini")
        for i in range(10)
    ]
    s = arena_hard.score_judgments(hard + creative)["m"]
    assert s["headline_category"] == "hard_prompt" and s["win_rate"]["score"] == 100.0
    assert s["arena_categories"]["creative_writing"]["score"] == 0.0  # not pooled into 50
    assert s["bradley_terry"] is None  # two baselines: no single anchor
    alone = arena_hard.score_judgments(creative)["m"]  # no hard prompts judged (--limit)
    assert alone["headline_category"] is None and alone["win_rate"]["score"] is None
    assert alone["arena_categories"]["creative_writing"]["score"] == 0.0


def test_upstream_records_score_null_games_and_v01_fields() -> None:
    """Upstream writes null for a game whose judge call failed; v0.1 files name the question
    question_id and no baseline."""
    legacy = [{"question_id": str(i), "model": "m", "judge": "gpt-4",
               "games": [{"score": "B>A"}, {"score": "A>B"}]} for i in range(5)]  # fmt: skip
    legacy.append({"question_id": "9", "model": "m", "judge": "gpt-4", "games": [None, None]})
    with pytest.raises(ValueError, match="baseline"):
        arena_hard.score_judgments(legacy)
    s = arena_hard.score_judgments(legacy, baseline=arena_hard.V01_BASELINE)["m"]
    assert s["win_rate"]["score"] == 100.0 and s["unparseable"] == 1
    assert s["baselines"] == ["gpt-4-0314"] and s["bradley_terry"]["score"] > 99


def test_bootstrap_is_seeded_and_brackets_the_score() -> None:
    labels = ["A>B", "B>A", "A=B", "B>>A", "A>>B"]
    records = [_record("m", labels[i % 5], labels[(i * 3) % 5], str(i)) for i in range(40)]
    first = arena_hard.score_judgments(records, seed=7)["m"]
    again = arena_hard.score_judgments(records, seed=7)["m"]
    assert first == again
    for method in ("win_rate", "bradley_terry"):
        low, high = first[method]["ci"]
        assert low <= first[method]["score"] <= high and low < high


class ScriptedJudge:
    """A judge backend that answers from a script and records what it was asked."""

    def __init__(
        self,
        replies: Sequence[str | Exception] | Callable[[Sequence[ChatTurn]], str],
        name: str = "scripted",
    ):
        self.replies = replies if callable(replies) else list(replies)
        self.asked: list[list[ChatTurn]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def cache_scope(self) -> str:
        return self._name

    async def complete(
        self, messages: Sequence[ChatTurn], temperature: float, max_tokens: int
    ) -> str:
        self.asked.append(list(messages))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if callable(self.replies):
            return self.replies(messages)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


async def test_games_swap_positions_and_a_missing_verdict_may_get_a_follow_up() -> None:
    data = load_arena_hard(version="v0.1")
    question = data.questions[0]
    backend = ScriptedJudge(["thinking...", "so [[A>B]]", "[[B>A]]"])
    record = await arena_hard.judge_answer(
        Judge(backend), data, question, "sys", "MY ANSWER", attempts=2
    )
    assert record is not None
    game1, game2 = backend.asked[0][1].content, backend.asked[2][1].content
    baseline = data.baselines["gpt-4-0314"][question.uid]
    assert game1.index(baseline) < game1.index("MY ANSWER")  # game 1: the baseline is A
    assert game2.index("MY ANSWER") < game2.index(baseline)  # game 2: the system is A
    assert backend.asked[1][-1].content == arena_hard.FOLLOW_UP
    assert [g["score"] for g in record["games"]] == ["A>B", "B>A"]
    assert backend.asked[0][0].content == data.settings["arena-hard-v0.1"].system_prompt
    once = ScriptedJudge(["thinking..."])
    record = await arena_hard.judge_answer(Judge(once), data, question, "sys", "MY ANSWER")
    assert record is not None and [g["score"] for g in record["games"]] == [None, None]
    assert len(once.asked) == 2  # the current upstream judge asks once per game


# -- the judge -------------------------------------------------------------------------------


async def test_judge_retries_transient_errors_and_stops_on_permanent_ones() -> None:
    flaky = ScriptedJudge([JudgeError("503", TRANSIENT), "Rating: [[9]]"])
    judge = Judge(flaky, backoff_s=0.001)
    assert await judge.complete([ChatTurn("user", "x")], 0.0, 10) == "Rating: [[9]]"
    assert judge.stats.retries == 1 and judge.stats.calls == 2
    broken = ScriptedJudge([JudgeError("401 bad key", SETUP)])
    judge = Judge(broken, backoff_s=0.001)
    with pytest.raises(JudgeError, match="bad key"):
        await judge.complete([ChatTurn("user", "x")], 0.0, 10)
    assert judge.stats.calls == 1
    down = ScriptedJudge([JudgeError("down", TRANSIENT)])
    judge = Judge(down, retries=2, backoff_s=0.001)
    with pytest.raises(JudgeError, match="down") as raised:
        await judge.complete([ChatTurn("user", "x")], 0.0, 10)
    assert judge.stats.calls == 3
    assert raised.value.kind == SETUP and "has not answered once" in str(raised.value)
    # Once the judge has answered, an outage is an outage: the item is left for a rerun.
    judge = Judge(ScriptedJudge(["[[5]]", JudgeError("down", TRANSIENT)]), retries=1,
                  backoff_s=0.001)  # fmt: skip
    await judge.complete([ChatTurn("user", "x")], 0.0, 10)
    with pytest.raises(JudgeError) as raised:
        await judge.complete([ChatTurn("user", "y")], 0.0, 10)
    assert raised.value.kind == TRANSIENT


@pytest.mark.parametrize(
    ("status", "message", "name", "kind"),
    [
        (503, "Service Unavailable", "ServiceUnavailableError", TRANSIENT),
        (429, "rate limited", "RateLimitError", TRANSIENT),
        (None, "Connection refused", "APIConnectionError", TRANSIENT),
        (401, "Incorrect API key provided", "AuthenticationError", SETUP),
        (404, "The model `gpt-5o` does not exist", "NotFoundError", SETUP),
        (400, "Unsupported parameter: 'temperature'", "BadRequestError", SETUP),
        (400, "This model's maximum context length is 4096 tokens", "BadRequestError", PROMPT),
        (400, "prompt too large", "ContextWindowExceededError", PROMPT),
        (400, "flagged", "ContentPolicyViolationError", PROMPT),
        (413, "Request Entity Too Large", "APIStatusError", PROMPT),
    ],
)
def test_judge_failures_are_classified(status: int | None, message: str, name: str,
                                       kind: str) -> None:  # fmt: skip
    assert classify(status, message, name) == kind


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("max_tokens=9000 cannot be greater than max_model_len=4096.", SETUP),  # vLLM 0.32
        ("This model's maximum context length is 4096 tokens. However, you requested 9000", SETUP),
        (
            "This model's maximum context length is 16384 tokens. However, you requested 20000",
            PROMPT,
        ),  # this prompt is too long; others fit
    ],
)
async def test_new_tokens_beyond_the_judges_whole_context_stop_the_run(
    monkeypatch: pytest.MonkeyPatch, message: str, kind: str
) -> None:
    import litellm

    from coe.evals.judge import LiteLLMJudge

    class BadRequest(Exception):
        status_code = 400

    async def refuse(**kwargs: Any) -> None:
        raise BadRequest(message)

    monkeypatch.setattr(litellm, "acompletion", refuse)
    with pytest.raises(JudgeError) as raised:
        await LiteLLMJudge("hosted_vllm/j", "http://x/v1").complete(
            [ChatTurn("user", "q")], 0, 9000
        )
    assert raised.value.kind == kind
    assert ("leaves no room" in str(raised.value)) == (kind == SETUP)


async def test_empty_outputs_are_not_cached_and_servers_do_not_share_entries(
    tmp_path: Path,
) -> None:
    from coe.evals.judge import LiteLLMJudge

    cache = JudgmentCache(tmp_path / "cache.sqlite")
    backend = ScriptedJudge(["", "[[7]]"])
    judge = Judge(backend, cache)
    assert await judge.complete([ChatTurn("user", "q")], 0.0, 10) == ""
    assert await judge.complete([ChatTurn("user", "q")], 0.0, 10) == "[[7]]"
    assert len(backend.asked) == 2
    here = LiteLLMJudge("hosted_vllm/judge", "http://a:8000/v1").cache_scope
    there = LiteLLMJudge("hosted_vllm/judge", "http://b:8000/v1").cache_scope
    assert here != there and LiteLLMJudge("openai/gpt-4.1").cache_scope == "openai/gpt-4.1"


async def test_judge_cache_makes_a_rerun_free_and_concurrency_is_limited(tmp_path: Path) -> None:
    backend = ScriptedJudge(["[[5]]"])
    cache = JudgmentCache(tmp_path / "cache.sqlite")
    judge = Judge(backend, cache, concurrency=2)
    prompts = [[ChatTurn("user", f"q{i}")] for i in range(6)]
    await asyncio.gather(*(judge.complete(p, 0.0, 10) for p in prompts))
    assert backend.most_in_flight == 2 and len(backend.asked) == 6
    cache.close()
    again = Judge(backend, JudgmentCache(tmp_path / "cache.sqlite"))
    await asyncio.gather(*(again.complete(p, 0.0, 10) for p in prompts))
    assert len(backend.asked) == 6 and again.stats.cached == 6
    await again.complete(prompts[0], 0.0, 11)  # another max_tokens is another request
    assert len(backend.asked) == 7


# -- runs and reports ------------------------------------------------------------------------


class EchoAnswerer:
    """Stands in for the pool: answers with the question's key; each expert has a size."""

    def __init__(self, system: str, expert: str, params: int):
        self.system = System(system)
        self.expert = expert
        self.params = params
        self.calls = 0

    async def answer(self, messages: list[dict[str, str]], *, key: str, category: str,
                     decision: Any, temperature: float, max_tokens: int) -> Turn:  # fmt: skip
        self.calls += 1
        d = RouteDecision(self.expert, category, 0.9, False, "test")
        record = {"expert": self.expert, "category": category, "params": self.params,
                  "latency_s": 0.01, "prompt_tokens": 5, "completion_tokens": 3}  # fmt: skip
        return Turn(f"{self.expert}'s answer to {key} turn {len(messages) // 2 + 1}", d, record)


def _rate_only_big(messages: Sequence[ChatTurn]) -> str:
    """Decided by what is judged, not by arrival order: the judge runs concurrently."""
    return "Rating: [[8]]" if "big's answer" in messages[-1].content else "no rating"


async def _run_mt(folder: RunFolder, answerers: dict[str, EchoAnswerer], limit: int) -> Any:
    task = MTBenchTask(load_mt_bench(), 64, 64)
    systems = [a.system for a in answerers.values()]
    folder.open({"benchmark": task.name, "judge": "scripted", "systems": list(answerers)})
    plan = plan_run(folder, task, systems, limit)
    backend = ScriptedJudge(_rate_only_big)
    result = await execute(folder, task, plan, answerers, Judge(backend), concurrency=4)  # type: ignore[arg-type]
    return plan, result, backend


async def test_mt_bench_run_resumes_and_reports(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    answerers = {
        "auto": EchoAnswerer("auto", "small", 1_000_000_000),
        "big": EchoAnswerer("big", "big", 7_000_000_000),
    }
    plan, result, backend = await _run_mt(folder, answerers, limit=2)
    assert (len(plan.answers), plan.waiting_judgments) == (4, 8)
    assert result.answered == 4 and result.judged == 8 and not result.failures
    rows = folder.answers()
    assert {r["model_id"] for r in rows} == {"auto", "big"}
    assert rows[0]["choices"][0]["turns"][1].endswith("turn 2")  # the second turn saw the first
    judgment = folder.judgments()[0]
    assert set(judgment) == {"question_id", "model", "judge", "user_prompt", "judgment", "score",
                             "turn", "tstamp"}  # fmt: skip

    # A rerun does nothing; a lost judgment and a half-written line are redone.
    plan, result, backend = await _run_mt(folder, answerers, limit=2)
    assert plan.empty and backend.asked == []
    lines = (folder.path / "judgments.jsonl").read_text().splitlines()
    (folder.path / "judgments.jsonl").write_text("\n".join(lines[:-1]) + '\n{"question_id": 8')
    plan, result, backend = await _run_mt(folder, answerers, limit=2)
    assert len(plan.judgments) == 1 and not plan.answers and result.judged == 1

    # A half-written answer: that item is answered and judged again, the row appended next is
    # not swallowed by the cut line, and the scores count each item once (its last rows).
    lines = (folder.path / "answers.jsonl").read_text().splitlines()
    (folder.path / "answers.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    plan, result, backend = await _run_mt(folder, answerers, limit=2)
    assert len(plan.answers) == 1 and result.answered == 1 and result.judged == 2
    assert len(folder.answers()) == 4 and len(folder.judgments()) == 10
    assert len(load_run(folder.path).judgments) == 8

    run = load_run(folder.path)
    paths = write_report([run], tmp_path / "report")
    for path in paths.values():
        assert path.stat().st_size > 0
    report = json.loads(paths["json"].read_text())["mt-bench"]
    assert report["auto"]["avg_active_params"] == 1_000_000_000
    assert report["big"]["requests"] == 4
    assert report["auto"]["unparseable"] + report["big"]["unparseable"] >= 1
    assert "| auto |" in paths["markdown"].read_text()
    table = expert_scores([run], ["big", "small"])
    assert list(table["scores"]) == ["big"]
    assert set(table["frequencies"]) == {"writing"}  # the first two questions are writing
    # What `coe router map --scores` and --system oracle read.
    (tmp_path / "scores.json").write_text(json.dumps(table))
    assert load_scores(tmp_path / "scores.json").scores == table["scores"]


async def test_arena_hard_run_skips_questions_without_a_baseline(tmp_path: Path) -> None:
    data = load_arena_hard(version="v2.0")
    missing = ArenaQuestion("no-such-uid", "creative_writing", "creative_writing", "Write.")
    small = ArenaHardData(
        root=data.root, version="v2.0", questions=[missing, *data.questions[:2]],
        settings=data.settings, baselines=data.baselines, prompt_template=data.prompt_template,
        regex_patterns=data.regex_patterns,
    )  # fmt: skip
    task = ArenaHardTask(small, 64, 64)
    assert task.skipped == 1 and len(task.questions) == 2
    folder = RunFolder(tmp_path / "arena")
    folder.open({"benchmark": task.name, "judge": "scripted", "systems": ["auto"]})
    answerers = {"auto": EchoAnswerer("auto", "small", 10)}
    plan = plan_run(folder, task, [System("auto")], None)
    result = await execute(folder, task, plan, answerers, Judge(ScriptedJudge(["[[B>A]]"])))  # type: ignore[arg-type]
    assert result.judged == 2
    scores = load_run(folder.path)
    record = scores.judgments[0]
    assert record["baseline"] == "o3-mini-2025-01-31" and len(record["games"]) == 2


def test_a_rerun_with_other_settings_is_refused_but_may_add_systems(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    meta = {"benchmark": "mt-bench", "judge": "j", "systems": ["auto"],
            "settings": {"max_tokens": 1024, "reference": "gpt-4"}}  # fmt: skip
    folder.open(meta)
    folder.open({**meta, "systems": ["coder"]})
    assert folder.meta()["systems"] == ["auto", "coder"]
    with pytest.raises(RunError, match="max_tokens 1024, not 64"):
        folder.open({**meta, "settings": {"max_tokens": 64, "reference": "gpt-4"}})
    # A run.json written before settings were recorded resumes, and records them from then on.
    older = RunFolder(tmp_path / "older")
    older.open({k: v for k, v in meta.items() if k != "settings"})
    older.open(meta)
    assert older.meta()["settings"] == meta["settings"]


async def test_a_misconfigured_judge_stops_the_run_and_a_refused_prompt_is_recorded(
    tmp_path: Path,
) -> None:
    task = MTBenchTask(load_mt_bench(), 64, 64)
    answerers = {"auto": EchoAnswerer("auto", "small", 10)}

    async def run(folder: RunFolder, error: JudgeError) -> Any:
        folder.open({"benchmark": task.name, "judge": "scripted", "systems": ["auto"]})
        plan = plan_run(folder, task, [System("auto")], 2)
        judge = Judge(ScriptedJudge([error]))
        return await execute(folder, task, plan, answerers, judge)  # type: ignore[arg-type]

    stopped = RunFolder(tmp_path / "bad-key")
    with pytest.raises(RunError, match="misconfigured"):
        await run(stopped, JudgeError("401 bad key", SETUP))
    assert stopped.judgments() == []
    refused = RunFolder(tmp_path / "too-long")
    result = await run(refused, JudgeError("maximum context length", PROMPT))
    assert result.judged == 4
    assert all(
        j["score"] == -1 and j["judgment"].startswith("$ERROR$") for j in refused.judgments()
    )


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b'{"a": 1}\n{"a": 2}\n', b'{"a": 1}\n{"a": 2}\n'),  # whole: untouched
        (b'{"a": 1}\n{"a": 2', b'{"a": 1}\n'),
        (b'{"a": 1}\n' + b"x" * 200_000, b'{"a": 1}\n'),  # a tail longer than one block
        (b"x" * 200_000, b""),  # no whole line at all
        (b"", b""),
    ],
)
def test_a_partial_last_line_is_cut_back_to_the_last_newline(
    tmp_path: Path, content: bytes, kept: bytes
) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(content)
    assert cut_partial_line(path) == (content != kept)
    assert path.read_bytes() == kept


def test_an_arena_hard_config_without_judge_settings_is_a_clear_error(tmp_path: Path) -> None:
    shipped = evaldata_dir() / "arena_hard"
    (tmp_path / "arena_hard").mkdir()
    (tmp_path / "arena_hard" / "v2.0").symlink_to(shipped / "v2.0")
    config = tmp_path / "arena_hard" / "config"
    config.mkdir()
    (config / "arena-hard-v2.0.yaml").write_text(
        (shipped / "config/arena-hard-v2.0.yaml").read_text()
    )
    (config / "judge_settings.json").write_text('{"SETTINGS": {}}')
    with pytest.raises(EvalDataError, match=r"no 'JUDGE_SETTINGS' in arena-hard-v2\.0\.yaml or"):
        load_arena_hard(tmp_path, "v2.0")


def test_a_run_folder_refuses_another_judge(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.open({"benchmark": "mt-bench", "judge": "a", "systems": ["auto"]})
    with pytest.raises(ValueError, match="judge"):
        folder.open({"benchmark": "mt-bench", "judge": "b", "systems": ["auto"]})


def test_question_keys_are_unique() -> None:
    assert len({q.key for q in load_arena_hard(version="v2.0").questions}) == 750
    assert isinstance(load_arena_hard(version="v0.1").questions[0], ArenaQuestion)


# -- systems ---------------------------------------------------------------------------------


def test_oracle_takes_the_best_expert_per_category_and_random_is_seeded(tmp_path: Path) -> None:
    from coe.config import parse_config
    from coe.evals.systems import SystemSpecError, resolve_systems
    from coe.orchestrator import Orchestrator

    from .conftest import pool_dict

    config = parse_config(pool_dict(), tmp_path / "experts.yaml")
    scores = tmp_path / "scores.json"
    table = {"qa": {"writing": 3.0, "math": 6.0}, "chatty": {"writing": 7.5, "math": 2.0}}
    scores.write_text(json.dumps({"scores": table}))
    oracle, rnd, expert = resolve_systems(["oracle", "random", "qa"], config, scores)
    assert oracle.oracle_map == {"math": "qa", "writing": "chatty"}
    orch = Orchestrator(config)  # engines are not started: deciding needs none
    decide = Answerer(orch, oracle)._first_decision
    assert decide([], "1", "writing").expert == "chatty"
    assert decide([], "1", "writing").category == "writing"  # its strategy applies
    assert decide([], "2", "math").expert == "qa"
    with pytest.raises(SystemSpecError, match="stem"):
        oracle.check_covers({"writing", "stem"})
    picks = {Answerer(orch, rnd)._first_decision([], str(i), "x").expert for i in range(40)}
    assert picks == {"qa", "chatty"}
    again = [Answerer(orch, rnd)._first_decision([], str(i), "x").expert for i in range(10)]
    assert again == [Answerer(orch, rnd)._first_decision([], str(i), "x").expert
                     for i in range(10)]  # fmt: skip
    assert Answerer(orch, expert)._first_decision([], "1", "math").expert == "qa"
    with pytest.raises(SystemSpecError, match="oracle-scores"):
        resolve_systems(["oracle"], config, None)
    with pytest.raises(SystemSpecError, match="unknown system"):
        resolve_systems(["gpt-5"], config, None)
