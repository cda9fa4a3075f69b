"""`coe route`, `coe router fit|eval|map` and `coe bench router`: the router's commands."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from coe.cli_exit import fail
from coe.config import PoolConfig
from coe.router.classifiers.registry import CLASSIFIERS


def load_router(
    cfg: PoolConfig, router_path: Path | None = None, backend: str | None = None
) -> Any:
    """The configured router (or the one in ROUTER_PATH); a broken one is a clear error."""
    from coe.router.artifact import RouterArtifactError
    from coe.router.embed import EmbedderError
    from coe.router.router import TwoStageRouter

    if sys.stderr.isatty():
        click.echo("loading the router (the first run builds its ONNX embedder)", err=True)
    try:
        return TwoStageRouter.from_config(cfg, router_path, backend)
    except (RouterArtifactError, EmbedderError) as exc:
        fail(str(exc))


def register(main: click.Group, bench: click.Group, pass_ctx: Any) -> None:
    """Attach the router commands to the CLI's groups."""

    @main.command()
    @click.argument("prompt", required=False)
    @click.option("--json", "as_json", is_flag=True, help="Print the RouteDecision as JSON.")
    @click.option(
        "--router", "router_path", type=click.Path(path_type=Path), help="Router folder to use."
    )
    @click.option(
        "--messages",
        "messages_file",
        type=click.File("r"),
        help='A whole conversation to route: a JSON list of {"role", "content"} (OpenAI '
        "style; - reads stdin). Its latest turn is routed with the task it belongs to.",
    )
    @pass_ctx
    def route(
        ctx: Any, prompt: str | None, as_json: bool, router_path: Path | None, messages_file: Any
    ) -> None:
        """Show where PROMPT (or a conversation) would go: category, confidence, expert."""
        from coe.types import Message

        if messages_file is not None:
            if prompt is not None:
                raise click.UsageError("give PROMPT or --messages, not both")
            messages = _read_messages(messages_file)
        else:
            if prompt == "-":
                prompt = sys.stdin.read()
            if prompt is None or not prompt.strip():
                raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
            messages = [Message("user", prompt)]
        from coe.orchestrator import with_shaping
        from coe.prompts.mixture import MixtureError
        from coe.prompts.strategies import Strategies

        router = load_router(ctx.config, router_path)
        decision = router.route(messages)
        try:
            shaping = Strategies(ctx.config, lambda: router.embedder).describe(
                decision.category, messages
            )
        except MixtureError as exc:
            fail(str(exc))
        decision = with_shaping(decision, shaping)
        if as_json:
            click.echo(json.dumps(decision.as_dict(), ensure_ascii=False))
            return
        click.echo(
            f"{decision.category} → {decision.expert}  (confidence {decision.confidence:.2f}, "
            f"{decision.latency_s * 1e3:.1f} ms)"
        )
        click.echo(f"  {decision.reason}")
        if decision.strategy != "none":
            where = f", region {decision.region}" if decision.region is not None else ""
            click.echo(f"  strategy: {decision.strategy}{where}")
            if decision.identity:
                click.echo(f"  identity ({decision.identity_source}): {decision.identity}")
        for category, p in decision.alternatives:
            click.echo(f"  runner-up: {category} {p:.2f}")

    @main.group()
    def router() -> None:
        """Fit, evaluate and map the two-stage router (embedding -> classifier -> expert)."""

    @router.command("fit")
    @click.argument("data", type=click.Path(path_type=Path))
    @click.option("--out", type=click.Path(path_type=Path), required=True, help="Router folder.")
    @click.option(
        "--kind", type=click.Choice(list(CLASSIFIERS)), default="logreg", show_default=True
    )
    @click.option(
        "--embedding-model",
        default="sentence-transformers/all-MiniLM-L6-v2",
        show_default=True,
        help="A sentence-transformers model directory, or the default model's name.",
    )
    @click.option(
        "--backend",
        type=click.Choice(["onnx-int8", "torch"]),
        default="onnx-int8",
        show_default=True,
        help="How prompts are embedded (also at serving time).",
    )
    @click.option(
        "--max-seq-length", type=int, help="Tokens embedded [default: 64; 128 with --finetune]."
    )
    @click.option(
        "--tail-tokens",
        type=int,
        help="Of those, tokens from the end of a long prompt (onnx-int8; 0 = start only) "
        "[default: 16; 32 with --finetune].",
    )
    @click.option("--folds", default=5, show_default=True, help="Cross-validation folds.")
    @click.option(
        "--fallback-value",
        default=0.5,
        show_default=True,
        help="What a fallback answer is worth against a right (1) or wrong (0) specialist; "
        "sets the confidence threshold.",
    )
    @click.option(
        "--finetune",
        is_flag=True,
        help="Fine-tune the encoder end to end on DATA's training split (seeded, CPU) and ship "
        "it in --out as int8 ONNX; the held-out split calibrates and measures.",
    )
    @click.option(
        "--heldout-fraction",
        default=0.15,
        show_default=True,
        help="With --finetune: the share of DATA held out (chosen by a hash of each prompt).",
    )
    @click.option(
        "--followups",
        type=click.Path(path_type=Path, exists=True),
        help="With --finetune: a prompt sheet (or JSONL) of follow-up turns such as 'now make "
        "it shorter'; fits the detector that keeps them with their conversation's task.",
    )
    @click.option("--epochs", default=3, show_default=True, help="With --finetune: epochs.")
    @click.option("--seed", default=0, show_default=True, help="With --finetune: random seed.")
    def router_fit(
        data: Path,
        out: Path,
        kind: str,
        embedding_model: str,
        backend: str,
        max_seq_length: int | None,
        tail_tokens: int | None,
        folds: int,
        fallback_value: float,
        finetune: bool,
        heldout_fraction: float,
        followups: Path | None,
        epochs: int,
        seed: int,
    ) -> None:
        """Fit a router on DATA and save it to --out.

        DATA: a JSONL file of {"prompt", "category"} lines, or a folder of prompt sheets
        (CATEGORY.txt; see coe/router/sheets.py). Without --finetune, hyper-parameters,
        calibration and the fallback threshold come from cross-validation on DATA alone; with
        it, from DATA's held-out split.
        """
        from coe.router.data import DataError, read_labelled
        from coe.router.embed import EmbedderError, EmbedderSettings, load_embedder
        from coe.router.train import fit_router

        say = lambda m: click.echo(m, err=True)  # noqa: E731
        try:
            rows = read_labelled(data)
            if finetune:
                if backend != "onnx-int8" or kind != "logreg":
                    raise ValueError("--finetune serves with onnx-int8 and a linear head")
                artifact = _fit_finetuned(
                    rows,
                    out,
                    embedding_model,
                    128 if max_seq_length is None else max_seq_length,
                    32 if tail_tokens is None else tail_tokens,
                    heldout_fraction,
                    followups,
                    epochs,
                    seed,
                    fallback_value,
                    data.name,
                    say,
                )
                m = artifact.metrics
                click.echo(
                    f"saved {out}: {len(artifact.categories)} categories, {len(rows)} prompts "
                    f"({m['heldout_n']} held out); held-out accuracy "
                    f"{m['heldout_accuracy']:.3f}, macro-F1 {m['heldout_macro_f1']:.3f}, "
                    f"ECE {m['heldout_expected_calibration_error']:.3f}; threshold "
                    f"{artifact.threshold:.2f}; fine-tuned in {m['finetune_seconds']:.0f} s"
                )
                return
            embedder = load_embedder(
                EmbedderSettings(
                    model=embedding_model,
                    backend=backend,
                    max_seq_length=64 if max_seq_length is None else max_seq_length,
                    tail_tokens=0
                    if backend == "torch"
                    else 16
                    if tail_tokens is None
                    else tail_tokens,
                )
            )
            artifact = fit_router(
                rows,
                embedder,
                kind=kind,
                folds=folds,
                fallback_value=fallback_value,  # type: ignore[arg-type]
                source=data.name,
                report=say,
            )
        except (DataError, EmbedderError, ValueError) as exc:
            fail(str(exc))
        artifact.save(out)
        m = artifact.metrics
        click.echo(
            f"saved {out}: {len(artifact.categories)} categories, {len(rows)} prompts; "
            f"cross-validated accuracy {m['cv_accuracy']:.3f}, macro-F1 {m['cv_macro_f1']:.3f}; "
            f"threshold {artifact.threshold:.2f} (falls back on {m['cv_fallback_rate']:.0%})"
        )

    @router.command("eval")
    @click.argument("data", type=click.Path(path_type=Path))
    @click.option("--router", "router_path", type=click.Path(path_type=Path), help="Router folder.")
    @click.option(
        "--backend",
        type=click.Choice(["onnx-int8", "torch"]),
        help="Embed with this path instead of the one the router was fitted with.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @click.option(
        "--plot",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Write the confusion matrix to this PNG, and accuracy against coverage beside it "
        "(NAME-coverage.png).",
    )
    @pass_ctx
    def router_eval(
        ctx: Any,
        data: Path,
        router_path: Path | None,
        backend: str | None,
        as_json: bool,
        plot: Path | None,
    ) -> None:
        """Accuracy, macro-F1, per-category precision/recall and the confusion matrix on DATA.

        DATA: coe's JSONL or a folder of prompt sheets, the MT-Bench question file (first
        turns) or the Arena-Hard v2.0 question file (subcategories; creative_writing counts as
        writing).
        """
        from coe.router.data import DataError, read_labelled
        from coe.router.evaluate import evaluate, plot_confusion, plot_coverage

        try:
            rows = read_labelled(data)
        except DataError as exc:
            fail(str(exc))
        router = load_router(ctx.config, router_path, backend)
        report = evaluate(router, rows)
        if plot is not None:
            coverage_png = plot.with_name(f"{plot.stem}-coverage.png")
            plot_confusion(report, plot, title=f"{data.name}: accuracy {report.accuracy:.3f}")
            plot_coverage(report, coverage_png, title=f"{data.name}: accuracy against coverage")
        if as_json:
            click.echo(json.dumps(report.as_dict(), ensure_ascii=False))
            return
        _print_eval(report, data.name)
        if plot is not None:
            click.echo(f"confusion matrix written to {plot}, accuracy/coverage to {coverage_png}")

    @router.command("map")
    @click.option(
        "--scores",
        type=click.Path(path_type=Path, dir_okay=False),
        required=True,
        help='JSON: {"scores": {expert: {category: score}}, "frequencies": {category: w}}.',
    )
    @click.option(
        "--budget-params",
        type=float,
        help="Most average active parameters per request (default: no limit).",
    )
    @click.option("--write", is_flag=True, help="Write the chosen map into experts.yaml.")
    @click.option("--json", "as_json", is_flag=True, help="Print the frontier and choice as JSON.")
    @pass_ctx
    def router_map(
        ctx: Any, scores: Path, budget_params: float | None, write: bool, as_json: bool
    ) -> None:
        """Pick the category -> expert map with the best expected score within a budget.

        Prints the Pareto frontier: average active parameters against expected score.
        """
        from coe.router.mapping import (
            MappingError,
            best_within,
            load_scores,
            pareto_frontier,
            write_map,
        )

        cfg = ctx.config
        try:
            table = load_scores(scores)
            unknown = [e for e in table.scores if e not in cfg.expert_names]
            if unknown:
                raise MappingError(f"{scores}: experts not in {cfg.source}: {', '.join(unknown)}")
            params = {e.name: e.params for e in cfg.experts if e.params}
            frontier = pareto_frontier(table, params)
            chosen = best_within(frontier, budget_params)
        except MappingError as exc:
            fail(str(exc))
        changes = write_map(cfg.source, chosen.assignment) if write else []
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "frontier": [m.as_dict() for m in frontier],
                        "chosen": chosen.as_dict(),
                        "budget_params": budget_params,
                        "written": changes if write else None,
                    },
                    indent=2,
                )
            )
            return
        _print_frontier(frontier, chosen, budget_params)
        if write:
            click.echo(f"wrote {cfg.source}: " + ("; ".join(changes) or "no changes"))

    @bench.command("router")
    @click.option(
        "--prompts",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Labelled prompts for the batched run (default: Arena-Hard v2.0 questions).",
    )
    @click.option("--repeats", default=100, show_default=True, help="Single-prompt repeats.")
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    @pass_ctx
    def bench_router(ctx: Any, prompts: Path | None, repeats: int, as_json: bool) -> None:
        """Routing latency (p50/p99, short and long prompt) and batched throughput, beside plain
        sentence-transformers on PyTorch in the same run."""
        from coe.bench.router import run_router_bench
        from coe.paths import arena_hard_questions
        from coe.router.data import DataError, read_labelled

        path = prompts or arena_hard_questions()
        try:
            rows = read_labelled(path)
        except DataError as exc:
            fail(f"{exc} (set COE_EVALDATA or pass --prompts)")
        router = load_router(ctx.config)
        result = run_router_bench(router, rows, repeats)
        if as_json:
            click.echo(json.dumps(result.as_dict(), indent=2))
            return
        _print_bench(result, path.name)


def _read_messages(handle: Any) -> list[Any]:
    """A conversation from JSON: [{"role": "user", "content": "..."}, ...]; a clear error else."""
    from coe.types import Message

    where = getattr(handle, "name", "--messages")
    try:
        raw = json.load(handle)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"{where}: not JSON ({exc.msg})", param_hint="--messages"
        ) from None
    roles = ("system", "user", "assistant")
    if not isinstance(raw, list) or not all(
        isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str)
        for m in raw
    ):
        raise click.BadParameter(
            f'{where}: expected a list of {{"role": system|user|assistant, "content": text}}',
            param_hint="--messages",
        )
    if not any(m["role"] == "user" and m["content"].strip() for m in raw):
        raise click.BadParameter(f"{where}: no user message", param_hint="--messages")
    return [Message(m["role"], m["content"]) for m in raw]


def _fit_finetuned(
    rows: list[Any],
    out: Path,
    model: str,
    max_seq_length: int,
    tail_tokens: int,
    heldout_fraction: float,
    followups: Path | None,
    epochs: int,
    seed: int,
    fallback_value: float,
    source: str,
    say: Any,
) -> Any:
    from coe.router.data import read_labelled
    from coe.router.finetune import FinetuneSettings
    from coe.router.followup import FOLLOWUP
    from coe.router.train import fit_finetuned_router

    # Follow-up turns carry no category of their own: whatever the file says, they are one class.
    given = read_labelled(followups) if followups is not None else []
    turns = [dataclasses.replace(r, category=FOLLOWUP) for r in given]
    return fit_finetuned_router(
        rows,
        out,
        model=model,
        max_seq_length=max_seq_length,
        tail_tokens=tail_tokens,
        heldout_fraction=heldout_fraction,
        settings=FinetuneSettings(epochs=epochs, seed=seed),
        followups=turns,
        fallback_value=fallback_value,
        source=source,
        report=say,
    )


def _print_eval(report: Any, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    expert = "n/a" if report.expert_accuracy is None else f"{report.expert_accuracy:.3f}"
    console.print(
        f"{name}: n={report.n}  accuracy {report.accuracy:.3f}  coarse (3-way) "
        f"{report.coarse_accuracy:.3f}  right expert {expert}  macro-F1 {report.macro_f1:.3f}  "
        f"ECE {report.ece:.3f} (coarse {report.coarse_ece:.3f})"
    )
    console.print(
        f"below the threshold {report.threshold:.2f}: {report.fallback_rate:.1%}; accuracy "
        f"counting those as misses: {report.accuracy_with_fallback:.3f}"
    )
    cov = Table(title="accuracy against coverage")
    for col in ("threshold", "coverage", "accuracy", "coarse accuracy"):
        cov.add_column(col, justify="right")
    for p in report.coverage:
        mark = " ←" if p["threshold"] == report.threshold else ""
        cov.add_row(
            f"{p['threshold']:.2f}{mark}",
            f"{p['coverage']:.3f}",
            "-" if p["accuracy"] is None else f"{p['accuracy']:.3f}",
            "-" if p["coarse_accuracy"] is None else f"{p['coarse_accuracy']:.3f}",
        )
    console.print(cov)
    per = Table(title="per category")
    for col in ("category", "precision", "recall", "f1", "n"):
        per.add_column(col, justify="right" if col != "category" else "left")
    for c, m in report.per_category.items():
        per.add_row(
            c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"])
        )
    console.print(per)
    conf = Table(title="confusion (rows: true, columns: predicted)")
    conf.add_column("")
    for label in report.labels:
        conf.add_column(label[:8], justify="right")
    for label, row in zip(report.labels, report.confusion, strict=True):
        if not any(row):
            continue  # a category the data set has no prompts of
        conf.add_row(label, *[str(v) if v else "·" for v in row])
    console.print(conf)


def _print_frontier(frontier: list[Any], chosen: Any, budget: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Pareto frontier: average active parameters vs expected score")
    for col in ("", "avg active params", "expected score", "map"):
        table.add_column(col)
    for m in frontier:
        mark = "→" if m == chosen else ""
        mapping = ", ".join(f"{c}:{e}" for c, e in m.assignment.items())
        table.add_row(mark, f"{m.avg_active_params / 1e9:.2f}B", f"{m.expected_score:.3f}", mapping)
    Console().print(table)
    limit = "no budget" if budget is None else f"budget {budget / 1e9:.2f}B"
    click.echo(
        f"chosen ({limit}): expected score {chosen.expected_score:.3f} at "
        f"{chosen.avg_active_params / 1e9:.2f}B average active parameters"
    )


def _print_bench(result: Any, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    r, ref = result.router, result.reference
    table = Table(title=f"router benchmark ({result.prompts} prompts from {source})")
    table.add_column("measure")
    table.add_column(f"router: {r.backend}, {r.max_seq_length} tokens", justify="right")
    table.add_column(
        f"reference: sentence-transformers, {ref.max_seq_length} tokens", justify="right"
    )
    table.add_column("speed-up", justify="right")
    table.add_row(
        f"short prompt ({result.short_prompt_chars} chars) p50 / p99 ms",
        f"{r.short_p50_ms} / {r.short_p99_ms}",
        f"{ref.short_p50_ms} / {ref.short_p99_ms}",
        f"{result.speedup['short_p50']}x",
    )
    table.add_row(
        f"long prompt ({result.long_prompt_chars} chars) p50 / p99 ms",
        f"{r.long_p50_ms} / {r.long_p99_ms}",
        f"{ref.long_p50_ms} / {ref.long_p99_ms}",
        f"{result.speedup['long_p50']}x",
    )
    table.add_row(
        f"batched (batch {result.batch_size}) prompts/s",
        f"{r.batched_prompts_per_s}",
        f"{ref.batched_prompts_per_s}",
        f"{result.speedup['batched']}x",
    )
    table.add_row(
        "accuracy on those prompts (same classifier)",
        f"{r.batched_accuracy}",
        f"{ref.batched_accuracy}",
        "",
    )
    Console().print(table)
