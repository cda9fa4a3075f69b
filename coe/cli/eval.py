"""`coe eval`: MT-Bench and Arena-Hard for the composed system, its experts and baselines."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from coe.cli.runtime import (
    EXIT_FAILED,
    CliContext,
    experts_to_start,
    fail,
    open_pool,
    pass_cli,
)
from coe.config import PoolConfig

if TYPE_CHECKING:
    from rich.progress import Progress

    from coe.evals.judge import Judge
    from coe.evals.run import Plan, RunFolder, RunResult, Task
    from coe.evals.systems import System
    from coe.orchestrator import Orchestrator

F = TypeVar("F", bound=Callable[..., Any])


def _run_options(f: F) -> F:
    """Options shared by `coe eval mt-bench` and `coe eval arena-hard`."""
    options = [
        click.option(
            "--system", "systems", multiple=True, default=("auto",), show_default=True,
            help="What to measure (repeatable): auto (the composed system), an expert's name, "
            "random (an expert drawn per question) or oracle (the best expert per category, "
            "from --oracle-scores).",
        ),
        click.option(
            "--judge", envvar="COE_JUDGE", required=True,
            help="The judge: a litellm model (openai/gpt-4.1, hosted_vllm/NAME with "
            "--judge-base-url) or pool:EXPERT for an expert of this pool (env COE_JUDGE).",
        ),
        click.option(
            "--judge-base-url", envvar="COE_JUDGE_BASE_URL",
            help="OpenAI-compatible endpoint of the judge, e.g. a vLLM server you started "
            "(env COE_JUDGE_BASE_URL).",
        ),
        click.option(
            "--judge-api-key", envvar="COE_JUDGE_API_KEY",
            help="API key for the judge (env COE_JUDGE_API_KEY; else litellm's provider "
            "variables such as OPENAI_API_KEY).",
        ),
        click.option(
            "--judge-concurrency", default=8, show_default=True, type=click.IntRange(min=1),
            help="Judge requests in flight at once.",
        ),
        click.option(
            "--judge-cache", type=click.Path(path_type=Path, dir_okay=False),
            help="SQLite file of judge outputs reused across runs "
            "(default $COE_HOME/eval/judgments.sqlite).",
        ),
        click.option("--no-judge-cache", is_flag=True, help="Always ask the judge."),
        click.option(
            "--out", type=click.Path(path_type=Path, file_okay=False), required=True,
            help="Run folder (e.g. evals/runs/NAME); rerunning into it resumes.",
        ),
        click.option(
            "--data", type=click.Path(path_type=Path, file_okay=False), envvar="COE_EVALDATA",
            help="Benchmark data laid out like ../shared/evaldata (env COE_EVALDATA; default: "
            "../shared/evaldata, else the installed packages that ship it).",
        ),
        click.option(
            "--limit", type=click.IntRange(min=1), help="Only the first N questions (smoke runs)."
        ),
        click.option(
            "--concurrency", default=8, show_default=True, type=click.IntRange(min=1),
            help="Questions answered at once.",
        ),
        click.option(
            "--oracle-scores", type=click.Path(path_type=Path, dir_okay=False, exists=True),
            help="Per-category expert scores (`coe eval scores`) for --system oracle.",
        ),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


@click.group("eval")
def eval_() -> None:
    """Offline benchmarks: MT-Bench and Arena-Hard with an LLM judge."""


@eval_.command("mt-bench")
@_run_options
@click.option(
    "--max-tokens", default=1024, show_default=True, type=click.IntRange(min=1),
    help="New tokens per answer (FastChat: 1024).",
)  # fmt: skip
@click.option(
    "--judge-max-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
    help="Judge tokens per judgment (FastChat: 2048).",
)  # fmt: skip
@click.option(
    "--reference", default="gpt-4", show_default=True,
    help="Reference answers for math, reasoning and coding (reference_answer/NAME.jsonl).",
)  # fmt: skip
@pass_cli
def eval_mt_bench(cli: CliContext, **opts: Any) -> None:
    """Answer MT-Bench's 80 two-turn questions and grade each turn 1-10 (FastChat's
    single-answer grading). Resumable: rerun the same command to finish a run."""
    from coe.evals.data import load_mt_bench
    from coe.evals.run import MTBenchTask

    data = load_mt_bench(opts["data"], opts["reference"])
    _run_benchmark(
        cli.config, MTBenchTask(data, opts["max_tokens"], opts["judge_max_tokens"]), opts
    )


@eval_.command("arena-hard")
@_run_options
@click.option(
    "--version", "version", type=click.Choice(["v2.0", "v0.1"]), default="v2.0",
    show_default=True, help="Arena-Hard version (questions, baseline, judge prompts).",
)  # fmt: skip
@click.option(
    "--max-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
    help="New tokens per answer (cut to the expert's context).",
)  # fmt: skip
@click.option(
    "--judge-max-tokens", type=click.IntRange(min=1),
    help="Judge tokens per game (default: the version's config, 4096 or 16000).",
)  # fmt: skip
@click.option(
    "--judge-attempts", default=1, show_default=True, type=click.IntRange(1, 5),
    help="Judge calls per game while no verdict is found; each retry asks the judge to "
    "finish (v0.1's legacy judge used 2).",
)  # fmt: skip
@pass_cli
def eval_arena_hard(cli: CliContext, **opts: Any) -> None:
    """Answer Arena-Hard's prompts and judge each answer against the version's baseline
    in two games with positions swapped. Resumable: rerun the same command to finish."""
    from coe.evals.data import load_arena_hard
    from coe.evals.run import ArenaHardTask

    data = load_arena_hard(opts["data"], opts["version"])
    task = ArenaHardTask(data, opts["max_tokens"], opts["judge_max_tokens"], opts["judge_attempts"])
    if task.skipped:
        click.echo(f"{task.skipped} question(s) have no baseline answer: skipped", err=True)
    _run_benchmark(cli.config, task, opts)


@eval_.group("score")
def score() -> None:
    """Score a judgment file (yours or a published one)."""


@score.command("mt-bench")
@click.option(
    "--judgments", type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True, help="FastChat single-grading judgments (JSONL).",
)  # fmt: skip
@click.option(
    "--data", type=click.Path(path_type=Path, file_okay=False), envvar="COE_EVALDATA",
    help="MT-Bench data, for per-category scores (default: as for `coe eval mt-bench`).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def score_mt_bench(judgments: Path, data: Path | None, as_json: bool) -> None:
    """Turn 1, turn 2, overall and per-category means per model, leaving out judgments
    without a rating (-1), as FastChat's show_result does."""
    from coe.bench.report import print_table
    from coe.evals.data import load_mt_bench, read_jsonl
    from coe.evals.mt_bench import score_judgments

    rows = list(read_jsonl(judgments))
    questions = load_mt_bench(data).questions
    categories = {q.question_id: q.category for q in questions}
    scores = score_judgments(rows, categories)
    if as_json:
        click.echo(json.dumps(scores, indent=2))
        return

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    print_table(
        f"MT-Bench: {judgments.name}",
        ("model", "overall", "turn 1", "turn 2", "judgments", "unparseable"),
        [
            (m, fmt(s["overall"]), fmt(s["turn_1"]), fmt(s["turn_2"]), str(s["judgments"]),
             str(s["unparseable"]))
            for m, s in scores.items()
        ],
    )  # fmt: skip


@score.command("arena-hard")
@click.option(
    "--judgments", type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True, help="Arena-Hard judgments (JSONL, one record with two games per line).",
)  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@click.option(
    "--baseline",
    help="Baseline of records that name none (upstream v0.1 files: gpt-4-0314).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def score_arena_hard(judgments: Path, seed: int, baseline: str | None, as_json: bool) -> None:
    """Win rate against the baseline (v2.0 method, bootstrap 90% interval; hard_prompt is
    the headline, creative_writing beside it) and the Bradley-Terry win rate (v0.1 method,
    95% interval) per model."""
    from coe.bench.report import print_table
    from coe.evals.arena_hard import score_judgments
    from coe.evals.data import EvalDataError, read_jsonl

    try:
        scores = score_judgments(read_jsonl(judgments), seed, baseline)
    except KeyError as exc:
        fail(f"{judgments}: a record lacks the field {exc}")
    except (EvalDataError, ValueError) as exc:
        fail(f"{judgments}: {exc}")
    if as_json:
        click.echo(json.dumps(scores, indent=2))
        return
    rows = []
    for model, s in scores.items():
        bt = s["bradley_terry"] or {}
        arenas = s["arena_categories"] or {"-": {"score": None, "ci": [None, None]}}
        for arena, wr in arenas.items():
            rows.append(
                (model, arena, str(wr["score"]), f"{wr['ci'][0]} to {wr['ci'][1]}",
                 str(bt.get("score", "-")), str(s["unparseable"]))
            )  # fmt: skip
    print_table(
        f"Arena-Hard: {judgments.name}",
        ("model", "category", "win rate", "90% CI", "Bradley-Terry", "unparseable"),
        rows,
    )


@eval_.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--out", type=click.Path(path_type=Path, file_okay=False),
    help="Where to write report.md, report.json, categories.png, pareto.png "
    "(default: RUN/report for the first RUN).",
)  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
def eval_report(runs: tuple[Path, ...], out: Path | None, seed: int) -> None:
    """Scores per system and category, unparseable counts, average active parameters,
    and two plots: per-category scores and score against active parameters."""
    from coe.evals.report import load_run, write_report

    loaded = [load_run(r) for r in runs]
    paths = write_report(loaded, out or runs[0] / "report", seed)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@eval_.command("scores")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
    help="JSON file for `coe router map --scores` and `--oracle-scores`.",
)  # fmt: skip
@pass_cli
def eval_scores(cli: CliContext, runs: tuple[Path, ...], out: Path) -> None:
    """Per-category scores of each expert measured alone (runs with --system EXPERT),
    with how often each category occurs."""
    from coe.evals.report import expert_scores, load_run

    table = expert_scores([load_run(r) for r in runs], cli.config.expert_names)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    click.echo(f"wrote {out}: {', '.join(table['scores'])} on {len(table['frequencies'])} "
               "categories")  # fmt: skip


# -- running a benchmark ---------------------------------------------------------------------


def _run_benchmark(cfg: PoolConfig, task: Task, opts: dict[str, Any]) -> None:
    """Plan, start only what the remaining work needs, answer and judge, print the scores.

    A bad --system, or a run folder made with other settings, exits 2 (SystemSpecError,
    RunError); items that failed while working exit 1 after the scores."""
    from coe.evals.report import load_run, score_run
    from coe.evals.run import RunFolder, plan_run
    from coe.evals.systems import resolve_systems

    judge_name = _judge_name(cfg, opts["judge"])
    systems = resolve_systems(list(opts["systems"]), cfg, opts["oracle_scores"])
    folder = RunFolder(opts["out"])
    folder.open(
        {
            "benchmark": task.name,
            "judge": judge_name,
            "data": str(task.data.root),
            "pool": str(cfg.source),
            "systems": [s.name for s in systems],
            "settings": {**task.settings, "judge_base_url": opts["judge_base_url"]},
        }
    )
    plan = plan_run(folder, task, systems, opts["limit"])
    todo_judgments = len(plan.judgments) + plan.waiting_judgments
    click.echo(
        f"{task.name}: {len(plan.answers)} answers and {todo_judgments} judgments to do "
        f"in {folder.path}",
        err=True,
    )
    result = None if plan.empty else _execute(cfg, task, plan, systems, folder, opts)
    _print_scores(task.name, score_run(load_run(folder.path)))
    if result is not None and result.failures:
        for failure in result.failures[:10]:
            click.echo(f"failed: {failure}", err=True)
        fail(
            f"{len(result.failures)} item(s) failed; rerun the same command to retry them",
            EXIT_FAILED,
        )


def _execute(
    cfg: PoolConfig,
    task: Task,
    plan: Plan,
    systems: list[System],
    folder: RunFolder,
    opts: dict[str, Any],
) -> RunResult:
    """Start the experts the plan needs (none when only a remote judge is left), then answer
    and judge with progress bars."""
    import asyncio

    from coe.evals.run import RunError, execute
    from coe.evals.systems import Answerer

    experts = _experts_needed(cfg, plan, opts["judge"])
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(open_pool(cfg, experts, front_end="eval")) if experts else None
        orch = pool.orchestrator if pool is not None else None
        judge = _make_judge(opts, orch)
        if judge.cache is not None:
            stack.callback(judge.cache.close)
        answerers = {s.name: Answerer(orch, s) for s in systems} if orch else {}
        bars, tick = _progress_bars(
            {
                "answers": len(plan.answers),
                "judgments": len(plan.judgments) + plan.waiting_judgments,
            }
        )
        work = execute(folder, task, plan, answerers, judge, opts["concurrency"], tick)
        try:
            with bars:
                result = asyncio.run(work) if pool is None else pool.runner.run(work)
        except RunError as exc:  # the judge is misconfigured: nothing more can be judged
            fail(str(exc), EXIT_FAILED)
    s = judge.stats
    click.echo(
        f"answered {result.answered}, judged {result.judged} "
        f"(judge calls {s.calls}, from cache {s.cached}, retries {s.retries})",
        err=True,
    )
    return result


def _make_judge(opts: dict[str, Any], orch: Orchestrator | None) -> Judge:
    from coe.evals.judge import (
        POOL_PREFIX,
        Judge,
        JudgeBackend,
        JudgmentCache,
        LiteLLMJudge,
        PoolJudge,
        default_cache_path,
    )

    name = opts["judge"]
    backend: JudgeBackend
    if name.startswith(POOL_PREFIX):
        backend = PoolJudge(orch, name[len(POOL_PREFIX) :])
    else:
        backend = LiteLLMJudge(name, opts["judge_base_url"], opts["judge_api_key"])
    cache = None if opts["no_judge_cache"] else JudgmentCache(
        opts["judge_cache"] or default_cache_path()
    )  # fmt: skip
    return Judge(backend, cache, concurrency=opts["judge_concurrency"])


def _judge_name(cfg: PoolConfig, judge: str) -> str:
    """The judge as run.json records it (a pool judge with its model, so that a run folder
    never mixes two judges)."""
    from coe.evals.judge import POOL_PREFIX

    if not judge.startswith(POOL_PREFIX):
        return judge
    expert = judge[len(POOL_PREFIX) :]
    if expert not in cfg.expert_names:
        raise click.BadParameter(
            f"{expert!r} is not an expert of {cfg.source} ({', '.join(cfg.expert_names)})",
            param_hint="--judge",
        )
    return f"{POOL_PREFIX}{expert}({cfg.expert(expert).model})"


def _experts_needed(cfg: PoolConfig, plan: Plan, judge: str) -> list[str]:
    from coe.evals.judge import POOL_PREFIX

    needed: list[str] = []
    for system in {s.name for s, _ in plan.answers}:
        if system in cfg.expert_names:
            needed.append(system)
        elif system == "auto":
            needed += experts_to_start(cfg, None)
        else:  # random and oracle may pick any expert
            needed += cfg.expert_names
    judging = plan.judgments or plan.waiting_judgments
    if judge.startswith(POOL_PREFIX) and judging:
        needed.append(judge[len(POOL_PREFIX) :])
    return list(dict.fromkeys(needed))


def _progress_bars(totals: dict[str, int]) -> tuple[Progress, Callable[[str, int], None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bars = Progress(
        TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip
    tasks = {name: bars.add_task(name, total=total) for name, total in totals.items()}
    return bars, lambda which, n: bars.advance(tasks[which], n)


def _print_scores(benchmark: str, scores: dict[str, Any]) -> None:
    from coe.bench.report import print_table

    rows = []
    for system, s in scores.items():
        score = s.get("score")
        params = s.get("avg_active_params")
        rows.append(
            (
                system,
                "-" if score is None else f"{score:.2f}",
                "-" if params is None else f"{params / 1e6:,.0f}M",
                str(s.get("unparseable", 0)),
                str(s.get("answer_errors", 0)),
            )
        )
    print_table(
        benchmark,
        ("system", "score", "avg active params", "unparseable", "answer errors"),
        rows,
    )
