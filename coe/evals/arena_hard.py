"""Arena-Hard (v0.1 and v2.0) as lmarena/arena-hard-auto judges and scores it.

Each answer is judged against the version's baseline answer in two games with the positions
swapped (game 1: baseline is A; game 2: the system is A), so a judge that favours a position
cancels out. Verdict labels ``[[A>>B]]`` ... ``[[B>>A]]`` are read with the config's patterns:
the last match of the first pattern that matches the upper-cased judgment.

Two scores, each the method of its version:
- v2.0: every game gives the system 1, 0.5 or 0 points (a strong verdict counts 3 times); the
  score is their mean in percent over 100 bootstrap resamples, with a 90% interval (5-95%);
- v0.1: a Bradley-Terry model fitted by logistic regression on the same battles, anchored on the
  baseline (rating 1000); the score is the predicted win rate against the baseline, with a
  bootstrap 95% interval.
Against the baseline alone, a tie gives 50 and only wins give 100.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from coe.evals.data import ArenaHardData, ArenaQuestion
from coe.evals.judge import PROMPT, ChatTurn, Judge, JudgeError

STRONG_WEIGHT = 3
BOOTSTRAP_ROUNDS = 100
# Without a verdict, v0.1's judge was asked to finish (judge_config_v0.1_legacy.yaml:
# number_of_judgment_attempts 2); the current judge asks once. --judge-attempts chooses.
FOLLOW_UP = "continue your judgment and finish by outputting a final verdict label"
JUDGE_ATTEMPTS = 1
# v2.0's show_result.py reports one category at a time, hard_prompt unless told otherwise.
HEADLINE_CATEGORY = "hard_prompt"
LEGACY_CATEGORY = "arena-hard-v0.1"  # v0.1's judgment records name no category
V01_BASELINE = "gpt-4-0314"
# The labels v0.1's Bradley-Terry battles read; a game with any other label is left out.
V01_LABELS = ("A=B", "A>B", "A>>B", "B>A", "B>>A")

# The system's points from one game's label when the system is assistant A (show_result.py's
# label_to_score); when the system is B the points are 1 minus these.
POINTS_AS_A = {
    "A>B": [1.0],
    "A>>B": [1.0] * STRONG_WEIGHT,
    "A=B": [0.5],
    "A<<B": [0.0] * STRONG_WEIGHT,
    "A<B": [0.0],
    "B>A": [0.0],
    "B>>A": [0.0] * STRONG_WEIGHT,
    "B=A": [0.5],
    "B<A": [1.0],
    "B<<A": [1.0] * STRONG_WEIGHT,
}


def parse_verdict(judgment: str, patterns: Iterable[str]) -> str | None:
    """The verdict label, or None. The last match of the first pattern that matches."""
    for pattern in patterns:
        matches = [m for m in re.findall(pattern, judgment.upper()) if m != ""]
        if matches:
            return matches[-1].strip("\n")
    return None


def game_messages(
    data: ArenaHardData, question: ArenaQuestion, answer_a: str, answer_b: str
) -> list[ChatTurn]:
    user = data.prompt_template.format(
        QUESTION=question.prompt, ANSWER_A=answer_a, ANSWER_B=answer_b
    )
    system = data.settings[question.category].system_prompt
    return [ChatTurn("system", system), ChatTurn("user", user)]


async def _play(
    judge: Judge, data: ArenaHardData, messages: list[ChatTurn], max_tokens: int, attempts: int
) -> dict[str, Any]:
    """One game. Without a verdict, and with attempts left, the judge is asked to finish."""
    conversation = list(messages)
    judgment = ""
    label = None
    for _ in range(attempts):
        try:
            output = await judge.complete(conversation, data.judge_temperature, max_tokens)
        except JudgeError as exc:
            if exc.kind != PROMPT:  # a judge that cannot take this prompt: recorded, no verdict
                raise
            return {"score": None, "judgment": f"$ERROR$ {exc}", "user_prompt": messages[1].content}
        judgment = f"{judgment}\n{output}" if judgment else output
        label = parse_verdict(judgment, data.regex_patterns)
        if label is not None:
            break
        conversation += [ChatTurn("assistant", output), ChatTurn("user", FOLLOW_UP)]
    return {"score": label, "judgment": judgment, "user_prompt": messages[1].content}


async def judge_answer(
    judge: Judge, data: ArenaHardData, question: ArenaQuestion, model: str, answer: str,
    max_tokens: int | None = None, attempts: int = JUDGE_ATTEMPTS,
) -> dict[str, Any] | None:  # fmt: skip
    """Both games of one answer, as an Arena-Hard judgment record; None where the baseline has
    no answer to the question."""
    found = data.baseline_answer(question)
    if found is None:
        return None
    baseline, baseline_answer = found
    tokens = max_tokens or data.judge_max_tokens
    games = [
        await _play(judge, data, game_messages(data, question, a, b), tokens, attempts)
        for a, b in ((baseline_answer, answer), (answer, baseline_answer))
    ]
    return {
        "uid": question.uid,
        "category": question.category,
        "subcategory": question.subcategory,
        "judge": judge.name,
        "model": model,
        "baseline": baseline,
        "games": games,
        "tstamp": time.time(),
    }


def _label(game: Mapping[str, Any] | None) -> Any:
    # Upstream writes null for a game whose judge call failed.
    return game.get("score") if game else None


def battle_points(record: Mapping[str, Any]) -> list[float] | None:
    """The system's points from one judgment record (both games), or None when a game has no
    verdict (upstream drops such records)."""
    first, second = (_label(g) for g in record["games"])
    if first not in POINTS_AS_A or second not in POINTS_AS_A:
        return None
    return POINTS_AS_A[second] + [1.0 - p for p in POINTS_AS_A[first]]


def win_rate(points: list[float], seed: int = 0, rounds: int = BOOTSTRAP_ROUNDS) -> dict[str, Any]:
    """v2.0's score: the mean of bootstrap means of the points, in percent, with the 5% and
    95% quantiles of those means as the interval (show_result.py; seeded here)."""
    if not points:
        return {"score": None, "ci": [None, None], "battles": 0}
    values = np.asarray(points, dtype=float)
    rng = np.random.default_rng(seed)
    means = [rng.choice(values, size=len(values), replace=True).mean() for _ in range(rounds)]
    return {
        "score": round(100 * float(np.mean(means)), 2),
        "ci": [round(100 * float(np.quantile(means, q)), 2) for q in (0.05, 0.95)],
        "battles": len(values),
    }


# -- v0.1: Bradley-Terry -------------------------------------------------------------------


def battles_v01(record: Mapping[str, Any], baseline: str) -> list[tuple[str, str, str]]:
    """(model_a, model_b, winner) rows of one record, the baseline always model_a, a strong
    verdict repeated; a game without a verdict gives none."""
    model = str(record["model"])
    rows: list[tuple[str, str, str]] = []
    for index, game in enumerate(record["games"]):
        label = _label(game)
        if label not in V01_LABELS:
            continue
        points = POINTS_AS_A[label]
        # Points are for assistant A: the baseline in game 1, the system in game 2.
        baseline_points = points[0] if index == 0 else 1.0 - points[0]
        winner = {1.0: "model_a", 0.0: "model_b"}.get(baseline_points, "tie")
        rows += [(baseline, model, winner)] * len(points)
    return rows


def bradley_terry(
    battles: list[tuple[str, str, str]], anchor: str, scale: float = 400, base: float = 10
) -> dict[str, float]:
    """Ratings by maximum likelihood (logistic regression without penalty: C=inf), anchor
    at 1000."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    names = sorted({a for a, _, _ in battles} | {b for _, b, _ in battles})
    index = {n: i for i, n in enumerate(names)}
    rows = battles + battles  # each battle twice: a tie becomes one win for each side
    x = np.zeros((len(rows), len(names)))
    y = np.zeros(len(rows))
    for i, (a, b, winner) in enumerate(rows):
        x[i, index[a]] = math.log(base)
        x[i, index[b]] = -math.log(base)
        if winner == "model_a" or (winner == "tie" and i < len(battles)):
            y[i] = 1.0
    if len(set(y)) < 2:  # one outcome only: the likelihood has no maximum; push it far
        y = np.append(y, 1.0 - y[0])
        x = np.vstack([x, x[0] * 1e-6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-8, max_iter=1000)
        lr.fit(x, y)
    ratings = scale * lr.coef_[0] + 1000
    ratings += 1000 - ratings[index[anchor]]
    return {n: float(ratings[index[n]]) for n in names}


def _expected(rating: float, anchor: float, scale: float = 400, base: float = 10) -> float:
    return 1 / (1 + base ** ((anchor - rating) / scale))


def bt_win_rates(
    records: Iterable[Mapping[str, Any]], baseline: str, seed: int = 0,
    rounds: int = BOOTSTRAP_ROUNDS,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """v0.1's score per model: the fitted win rate against the baseline, with a bootstrap
    95% interval (battles resampled with replacement, the model refitted each time)."""
    battles = [b for r in records for b in battles_v01(r, baseline)]
    if not battles:
        return {}
    point = bradley_terry(battles, baseline)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        picked = rng.integers(0, len(battles), size=len(battles))
        fitted = bradley_terry([battles[i] for i in picked], baseline)
        for name, rating in fitted.items():
            samples[name].append(rating)
    out = {}
    for name, rating in point.items():
        if name == baseline:
            continue
        low, high = np.percentile(samples[name], [2.5, 97.5]) if samples[name] else (None, None)
        out[name] = {
            "score": round(100 * _expected(rating, 1000), 2),
            "ci": [
                round(100 * _expected(float(v), 1000), 2) if v is not None else None
                for v in (low, high)
            ],
            "rating": round(rating, 1),
            "battles": sum(1 for _, b, _ in battles if b == name),
        }
    return out


def score_judgments(
    records: Iterable[Mapping[str, Any]], seed: int = 0, baseline: str | None = None
) -> dict[str, dict[str, Any]]:
    """Per model: the v2.0 win rate per Arena-Hard category (``hard_prompt`` is the headline,
    ``creative_writing`` is reported beside it: upstream never pools the two, whose baselines
    differ) and per subcategory, the v0.1 Bradley-Terry win rate where there is one baseline,
    and how many records had a game without a verdict.

    Records as coe writes them, or upstream's (v0.1's name the question ``question_id`` and
    carry no baseline: pass ``baseline``)."""
    records = list(records)
    by_model: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_model[str(r["model"])].append(r)
    out: dict[str, dict[str, Any]] = {}
    for model, rows in sorted(by_model.items()):
        rows = [{**r, "baseline": r.get("baseline") or baseline} for r in rows]
        if any(r["baseline"] is None for r in rows):
            raise ValueError("judgment records without a baseline: pass the version's baseline")
        per_arena: dict[str, list[float]] = defaultdict(list)
        per_category: dict[str, list[float]] = defaultdict(list)
        unparseable = 0
        for r in rows:
            p = battle_points(r)
            if p is None:
                unparseable += 1
                continue
            arena = str(r.get("category") or LEGACY_CATEGORY)
            per_arena[arena] += p
            per_category[str(r.get("subcategory") or arena)] += p
        arenas = {a: win_rate(v, seed) for a, v in sorted(per_arena.items())}
        # hard_prompt, or v0.1's one category; never creative_writing standing in for it.
        headline = next((c for c in (HEADLINE_CATEGORY, LEGACY_CATEGORY) if c in arenas), None)
        baselines = sorted({str(r["baseline"]) for r in rows})
        bt: dict[str, Any] = {}
        if len(baselines) == 1:  # v0.1 has one baseline; v2.0's two make no single anchor
            bt = bt_win_rates(rows, baselines[0], seed).get(model, {})
        out[model] = {
            "win_rate": arenas[headline] if headline else win_rate([], seed),
            "headline_category": headline,
            "arena_categories": arenas,
            "bradley_terry": bt or None,
            "categories": {c: win_rate(v, seed)["score"] for c, v in sorted(per_category.items())},
            "judgments": len(rows),
            "unparseable": unparseable,
            "baselines": baselines,
        }
    return out
