"""MT-Bench as FastChat's llm_judge runs it: single-answer grading on a 1-10 scale.

Answers: two turns, the first answer kept in context for the second; per-category temperatures
and 1024 new tokens (FastChat's gen_model_answer). Judging: ``single-v1`` (``single-math-v1``
with the reference answer for math, reasoning and coding), their ``-multi-turn`` forms for the
second turn; temperature 0 and 2048 tokens. Scores: judgments rated -1 (unparseable) are left
out, then the mean per turn, overall and per category, as FastChat's show_result does.
"""

from __future__ import annotations

import ast
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from coe.evals.data import MTBenchData, MTQuestion
from coe.evals.judge import PROMPT, ChatTurn, Judge, JudgeError

# FastChat fastchat/llm_judge/common.py: temperature_config and NEED_REF_CATS.
TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7  # gen_model_answer's value for a category not in the table
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
MAX_NEW_TOKENS = 1024
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 2048

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
UNPARSED = -1


def temperature_for(category: str) -> float:
    return TEMPERATURE.get(category, DEFAULT_TEMPERATURE)


def parse_rating(judgment: str) -> float:
    """``[[rating]]``, else ``[rating]``; -1 when neither is there."""
    match = RATING.search(judgment) or RATING_BACKUP.search(judgment)
    if match is None:
        return UNPARSED
    return float(ast.literal_eval(match.group(1)))


def judge_prompt_name(category: str, turn: int) -> str:
    name = "single-math-v1" if category in NEED_REF_CATS else "single-v1"
    return f"{name}-multi-turn" if turn == 2 else name


def judge_messages(
    data: MTBenchData, question: MTQuestion, answers: tuple[str, ...], turn: int
) -> tuple[str, list[ChatTurn]]:
    """(judge prompt name, the judge's messages) for one turn of one answer."""
    name = judge_prompt_name(question.category, turn)
    prompt = data.judge_prompts[name]
    kwargs: dict[str, str] = {}
    if turn == 1:
        kwargs = {"question": question.turns[0], "answer": answers[0]}
    else:
        kwargs = {
            "question_1": question.turns[0],
            "question_2": question.turns[1],
            "answer_1": answers[0],
            "answer_2": answers[1],
        }
    if question.category in NEED_REF_CATS:
        ref = data.references.get(question.question_id)
        if ref is None:
            raise KeyError(
                f"MT-Bench question {question.question_id} ({question.category}) needs a "
                f"reference answer; {data.reference_model}.jsonl has none"
            )
        if turn == 1:
            kwargs["ref_answer_1"] = ref[0]
        else:
            kwargs["ref_answer_1"], kwargs["ref_answer_2"] = ref[0], ref[1]
    user = prompt.prompt_template.format(**kwargs)
    return name, [ChatTurn("system", prompt.system_prompt), ChatTurn("user", user)]


async def judge_turn(
    judge: Judge, data: MTBenchData, question: MTQuestion, model: str, answers: tuple[str, ...],
    turn: int, max_tokens: int = JUDGE_MAX_TOKENS,
) -> dict[str, Any]:  # fmt: skip
    """One FastChat judgment record. A judge that cannot take the prompt (too long, refused)
    is recorded as FastChat records an API error: judgment ``$ERROR$``, score -1."""
    name, messages = judge_messages(data, question, answers, turn)
    try:
        judgment = await judge.complete(messages, JUDGE_TEMPERATURE, max_tokens)
        score = parse_rating(judgment)
    except JudgeError as exc:
        if exc.kind != PROMPT:
            raise
        judgment, score = f"$ERROR$ {exc}", UNPARSED
    return {
        "question_id": question.question_id,
        "model": model,
        "judge": [judge.name, name],
        "user_prompt": messages[1].content,
        "judgment": judgment,
        "score": score,
        "turn": turn,
        "tstamp": time.time(),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_judgments(
    rows: Iterable[Mapping[str, Any]], categories: Mapping[int, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per model: turn 1, turn 2 and overall means over parsed ratings, the unparseable count,
    and (given question_id -> category) the mean per category."""
    by_model: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"turns": defaultdict(list), "categories": defaultdict(list), "unparseable": 0}
    )
    for row in rows:
        model = by_model[str(row["model"])]
        score = float(row["score"])
        if score == UNPARSED:
            model["unparseable"] += 1
            continue
        model["turns"][int(row["turn"])].append(score)
        if categories is not None:
            model["categories"][categories[int(row["question_id"])]].append(score)
    out = {}
    for name, m in sorted(by_model.items()):
        everything = [s for scores in m["turns"].values() for s in scores]
        out[name] = {
            "overall": _mean(everything),
            "turn_1": _mean(m["turns"][1]),
            "turn_2": _mean(m["turns"][2]),
            "judgments": len(everything) + m["unparseable"],
            "unparseable": m["unparseable"],
            "categories": {c: _mean(v) for c, v in sorted(m["categories"].items())},
        }
    return out
