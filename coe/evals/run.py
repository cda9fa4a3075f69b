"""A benchmark run: answer every question with every system, judge every answer, append both
to JSONL in the run folder as they finish. A rerun skips what is already there, so an
interrupted run resumes, and a finished one costs nothing.

    evals/runs/NAME/run.json          what was run: benchmark, judge, data, pool, systems
    evals/runs/NAME/answers.jsonl     FastChat / Arena-Hard answer rows, plus coe's per-request
                                      record: expert, category, latency, tokens, parameters
    evals/runs/NAME/judgments.jsonl   FastChat single-grading rows / Arena-Hard game pairs
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coe.errors import BadRequestError
from coe.evals import arena_hard, mt_bench
from coe.evals.data import ArenaHardData, ArenaQuestion, MTBenchData, MTQuestion
from coe.evals.judge import SETUP, Judge, JudgeError
from coe.evals.systems import Answerer, System
from coe.jsonl import read_jsonl

log = logging.getLogger(__name__)

MT_BENCH = "mt-bench"
ANSWERS, JUDGMENTS, META = "answers.jsonl", "judgments.jsonl", "run.json"


class RunError(BadRequestError):
    pass


# run.json keys a rerun must share with the run it resumes: anything that changes what an
# answer or a judgment is. Systems may be added.
SAME_ACROSS_RERUNS = ("benchmark", "judge", "settings")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A run file's rows; a line that is not a row (one a live run is writing) is skipped."""
    if not path.exists():
        return []
    return [row for _, row in read_jsonl(path, RunError, skip_bad=True)]


def last_per_key(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> list:
    """One row per key, the last written: an item redone (its row lost, say) replaces the old."""
    return list({key(r): r for r in rows}.values())


def cut_partial_line(path: Path) -> bool:
    """Drop a last line without its newline (a run killed mid-write), so that the next append
    starts a line of its own. That item is redone. True when something was cut."""
    if not path.exists():
        return False
    with path.open("r+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end == 0 or _read_at(handle, end - 1, 1) == b"\n":
            return False
        # Only the tail is read: back from the end, a block at a time, to the last newline.
        keep = 0
        while end > 0:
            start = max(0, end - _TAIL_BLOCK)
            newline = _read_at(handle, start, end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        handle.truncate(keep)
    log.warning("%s: dropped a partial last line; its item will be redone", path)
    return True


_TAIL_BLOCK = 1 << 16


def _read_at(handle: Any, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return bytes(handle.read(size))


class RunFolder:
    """The files of one run. Appends are whole lines, flushed as each item finishes."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def meta_path(self) -> Path:
        return self.path / META

    def meta(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.meta_path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"{self.path}: not a coe eval run (no readable {META}: {exc})") from None

    def open(self, meta: dict[str, Any]) -> None:
        """Start the run, or check that a rerun measures the same thing."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.meta_path.exists():
            old = self.meta()
            changed = [
                d for k in SAME_ACROSS_RERUNS for d in _differences(k, old.get(k), meta.get(k))
            ]
            if changed:
                name, was, now = changed[0]
                raise RunError(
                    f"{self.path} holds a run with {name} {was!r}, not {now!r}: "
                    "rerun with the same options, or pass another --out"
                )
            # Keys an older run.json lacks are taken from this run.
            systems = list(dict.fromkeys(old["systems"] + meta["systems"]))
            meta = {**meta, **{k: v for k, v in old.items() if v is not None}, "systems": systems}
        self.meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        for name in (ANSWERS, JUDGMENTS):
            cut_partial_line(self.path / name)

    def answers(self) -> list[dict[str, Any]]:
        return read_rows(self.path / ANSWERS)

    def judgments(self) -> list[dict[str, Any]]:
        return read_rows(self.path / JUDGMENTS)

    def append(self, name: str, row: dict[str, Any]) -> None:
        with (self.path / name).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _differences(key: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    if old is None:  # a run.json from before coe recorded this key
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [(k, old.get(k), new.get(k)) for k in sorted(old | new) if old.get(k) != new.get(k)]
    return [] if old == new else [(key, old, new)]


# -- the two benchmarks, as the runner sees them ---------------------------------------------


class MTBenchTask:
    name = MT_BENCH

    def __init__(self, data: MTBenchData, max_tokens: int, judge_max_tokens: int):
        self.data = data
        self.max_tokens = max_tokens
        self.judge_max_tokens = judge_max_tokens
        self.questions = data.questions
        self._by_key = {q.key: q for q in self.questions}

    def question(self, key: str) -> MTQuestion:
        return self._by_key[key]

    @property
    def settings(self) -> dict[str, Any]:
        """What decides an answer or a judgment besides the question (run.json)."""
        return {
            "max_tokens": self.max_tokens,
            "judge_max_tokens": self.judge_max_tokens,
            "reference": self.data.reference_model,
        }

    @staticmethod
    def answer_key(row: dict[str, Any]) -> tuple[str, str]:
        return str(row["model_id"]), str(row["question_id"])

    @staticmethod
    def judgment_key(row: dict[str, Any]) -> tuple[str, str, int]:
        return str(row["model"]), str(row["question_id"]), int(row["turn"])

    def judgment_keys(self, answer: dict[str, Any]) -> list[tuple[str, str, int]]:
        return [(answer["model_id"], str(answer["question_id"]), t) for t in (1, 2)]

    async def answer(self, answerer: Answerer, q: MTQuestion) -> dict[str, Any]:
        temperature = mt_bench.temperature_for(q.category)
        messages: list[dict[str, str]] = []
        texts, records = [], []
        decision = None
        for turn in q.turns:
            messages.append({"role": "user", "content": turn})
            done = await answerer.answer(
                messages, key=q.key, category=q.pool_category, decision=decision,
                temperature=temperature, max_tokens=self.max_tokens,
            )  # fmt: skip
            decision = done.decision  # later turns stay with the first turn's expert
            messages.append({"role": "assistant", "content": done.text})
            texts.append(done.text)
            records.append(done.record)
        return {
            "question_id": q.question_id,
            "answer_id": uuid.uuid4().hex,
            "model_id": answerer.system.name,
            "choices": [{"index": 0, "turns": texts}],
            "tstamp": time.time(),
            "category": q.category,
            "requests": records,
        }

    async def judge(
        self, judge: Judge, answer: dict[str, Any], key: tuple[str, str, int]
    ) -> dict[str, Any] | None:
        q = self.question(key[1])
        turns = tuple(answer["choices"][0]["turns"])
        return await mt_bench.judge_turn(
            judge, self.data, q, key[0], turns, key[2], self.judge_max_tokens
        )


class ArenaHardTask:
    def __init__(
        self,
        data: ArenaHardData,
        max_tokens: int,
        judge_max_tokens: int | None,
        judge_attempts: int = arena_hard.JUDGE_ATTEMPTS,
    ):
        self.data = data
        self.judge_attempts = judge_attempts
        self.name = f"arena-hard-{data.version}"
        self.max_tokens = max_tokens
        self.judge_max_tokens = judge_max_tokens
        # Questions the baseline did not answer cannot be judged: they are not asked.
        self.questions = [q for q in data.questions if data.baseline_answer(q) is not None]
        self.skipped = len(data.questions) - len(self.questions)
        self._by_key = {q.key: q for q in self.questions}

    def question(self, key: str) -> ArenaQuestion:
        return self._by_key[key]

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "judge_max_tokens": self.judge_max_tokens or self.data.judge_max_tokens,
            "judge_attempts": self.judge_attempts,
        }

    @staticmethod
    def answer_key(row: dict[str, Any]) -> tuple[str, str]:
        return str(row["model"]), str(row["uid"])

    @staticmethod
    def judgment_key(row: dict[str, Any]) -> tuple[str, str]:
        return str(row["model"]), str(row["uid"])

    def judgment_keys(self, answer: dict[str, Any]) -> list[tuple[str, str]]:
        return [(str(answer["model"]), str(answer["uid"]))]

    async def answer(self, answerer: Answerer, q: ArenaQuestion) -> dict[str, Any]:
        messages = [{"role": "user", "content": q.prompt}]
        done = await answerer.answer(
            messages, key=q.key, category=q.pool_category, decision=None, temperature=0.0,
            max_tokens=self.max_tokens,
        )  # fmt: skip
        return {
            "uid": q.uid,
            "ans_id": uuid.uuid4().hex,
            "model": answerer.system.name,
            "messages": [*messages, {"role": "assistant", "content": {"answer": done.text}}],
            "tstamp": time.time(),
            "category": q.category,
            "subcategory": q.subcategory,
            "requests": [done.record],
        }

    async def judge(
        self, judge: Judge, answer: dict[str, Any], key: tuple[str, str]
    ) -> dict[str, Any] | None:
        q = self.question(key[1])
        text = str(answer["messages"][-1]["content"]["answer"])
        return await arena_hard.judge_answer(
            judge, self.data, q, key[0], text, self.judge_max_tokens, self.judge_attempts
        )


Task = MTBenchTask | ArenaHardTask


# -- the runner ------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a run still has to do."""

    answers: list[tuple[System, Any]] = field(default_factory=list)  # (system, question)
    judgments: list[tuple[dict[str, Any], tuple]] = field(default_factory=list)  # (answer, key)
    waiting_judgments: int = 0  # judgments of answers not written yet

    @property
    def empty(self) -> bool:
        return not self.answers and not self.judgments


def plan_run(folder: RunFolder, task: Task, systems: list[System], limit: int | None) -> Plan:
    questions = task.questions[:limit] if limit else task.questions
    for system in systems:
        system.check_covers({q.pool_category for q in questions})
    answers = {task.answer_key(r): r for r in folder.answers()}
    judged = {task.judgment_key(r) for r in folder.judgments()}
    plan = Plan()
    for system in systems:
        for q in questions:
            row = answers.get((system.name, q.key))
            if row is None:
                plan.answers.append((system, q))
                plan.waiting_judgments += len(task.judgment_keys(_stub(task, system, q)))
                continue
            plan.judgments += [(row, k) for k in task.judgment_keys(row) if k not in judged]
    return plan


def _stub(task: Task, system: System, q: Any) -> dict[str, Any]:
    if isinstance(task, MTBenchTask):
        return {"model_id": system.name, "question_id": q.question_id}
    return {"model": system.name, "uid": q.uid}


@dataclass
class RunResult:
    answered: int = 0
    judged: int = 0
    failures: list[str] = field(default_factory=list)


Progress = Callable[[str, int], None]  # (which: "answers" | "judgments", how many done)


async def execute(
    folder: RunFolder,
    task: Task,
    plan: Plan,
    answerers: dict[str, Answerer],
    judge: Judge,
    concurrency: int = 8,
    progress: Progress | None = None,
) -> RunResult:
    """Answer, then judge each answer as soon as it is written (pipelined). A failure that a
    rerun may fix (an engine or judge outage) is reported and its item left for the rerun."""
    result = RunResult()
    answer_slots = asyncio.Semaphore(concurrency)
    tick = progress or (lambda which, n: None)

    async def judge_one(answer: dict[str, Any], key: tuple) -> None:
        try:
            row = await task.judge(judge, answer, key)
        except JudgeError as exc:
            if exc.kind == SETUP:
                raise  # every judgment would fail alike: stop, record nothing
            result.failures.append(f"judging {key}: {exc}")
            return
        except RuntimeError as exc:
            result.failures.append(f"judging {key}: {exc}")
            return
        if row is not None:
            folder.append(JUDGMENTS, row)
            result.judged += 1
        tick("judgments", 1)

    async def answer_one(system: System, q: Any) -> None:
        try:
            async with answer_slots:
                row = await task.answer(answerers[system.name], q)
        except Exception as exc:  # an engine failure: reported, retried by the next run
            log.debug("answer failed", exc_info=True)
            result.failures.append(f"answering {q.key} with {system.name}: {exc}")
            return
        folder.append(ANSWERS, row)
        result.answered += 1
        tick("answers", 1)
        async with asyncio.TaskGroup() as judging:  # a failure cancels its siblings too
            for k in task.judgment_keys(row):
                judging.create_task(judge_one(row, k))

    try:
        async with asyncio.TaskGroup() as group:
            for s, q in plan.answers:
                group.create_task(answer_one(s, q))
            for a, k in plan.judgments:
                group.create_task(judge_one(a, k))
    except BaseExceptionGroup as failed:
        errors = _leaves(failed)
        setup = [e for e in errors if isinstance(e, JudgeError)]
        for other in errors:
            if other not in setup:
                log.error("run stopped: %s", other, exc_info=other)
        if not errors:
            raise
        if not setup:
            raise errors[0] from None
        raise RunError(
            f"{setup[0]}\nThe judge is misconfigured (key, model name, endpoint or parameters); "
            "nothing was recorded for it. Fix --judge / --judge-base-url / --judge-api-key / "
            "--judge-max-tokens and rerun: the answers written so far are kept."
        ) from None
    return result


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in a (nested) group, cancellations left out."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        elif not isinstance(exc, asyncio.CancelledError):
            out.append(exc)
    return out
