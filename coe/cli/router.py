"""`coe router fit|eval|map`: fit, evaluate and map the two-stage router."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from coe.cli.runtime import CliContext, fail, load_router, pass_cli, plain_errors_are_bad_input
from coe.router.classifiers.registry import CLASSIFIERS

if TYPE_CHECKING:
    from coe.router.artifact import RouterArtifact
    from coe.router.data import LabelledPrompt
    from coe.router.evaluate import EvalReport
    from coe.router.mapping import ExpertMap


@click.group()
def router() -> None:
    """Fit, evaluate and map the two-stage router (embedding -> classifier -> expert)."""


@router.command("fit")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Router folder.")
@click.option("--kind", type=click.Choice(list(CLASSIFIERS)), default="logreg", show_default=True)
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
    from coe.router.data import read_labelled

    say = lambda m: click.echo(m, err=True)  # noqa: E731
    # Training refuses unusable data (one category, too few prompts) with a plain ValueError.
    with plain_errors_are_bad_input(ValueError):
        rows = read_labelled(data)
        if finetune:
            if backend != "onnx-int8" or kind != "logreg":
                fail("--finetune serves with onnx-int8 and a linear head")
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
        else:
            artifact = _fit_cross_validated(
                rows,
                kind,
                embedding_model,
                backend,
                64 if max_seq_length is None else max_seq_length,
                0 if backend == "torch" else 16 if tail_tokens is None else tail_tokens,
                folds,
                fallback_value,
                data.name,
                say,
            )
    m = artifact.metrics
    if finetune:  # fit_finetuned_router saved it in --out already
        click.echo(
            f"saved {out}: {len(artifact.categories)} categories, {len(rows)} prompts "
            f"({m['heldout_n']} held out); held-out accuracy "
            f"{m['heldout_accuracy']:.3f}, macro-F1 {m['heldout_macro_f1']:.3f}, "
            f"ECE {m['heldout_expected_calibration_error']:.3f}; threshold "
            f"{artifact.threshold:.2f}; fine-tuned in {m['finetune_seconds']:.0f} s"
        )
        return
    artifact.save(out)
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
@pass_cli
def router_eval(
    cli: CliContext,
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
    from coe.router.data import read_labelled
    from coe.router.evaluate import evaluate, plot_confusion, plot_coverage

    rows = read_labelled(data)
    report = evaluate(load_router(cli.config, router_path, backend), rows)
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
@pass_cli
def router_map(
    cli: CliContext, scores: Path, budget_params: float | None, write: bool, as_json: bool
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

    cfg = cli.config
    table = load_scores(scores)
    unknown = [e for e in table.scores if e not in cfg.expert_names]
    if unknown:
        raise MappingError(f"{scores}: experts not in {cfg.source}: {', '.join(unknown)}")
    params = {e.name: e.params for e in cfg.experts if e.params}
    frontier = pareto_frontier(table, params)
    chosen = best_within(frontier, budget_params)
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


# -- fitting ---------------------------------------------------------------------------------


def _fit_cross_validated(
    rows: list[LabelledPrompt],
    kind: str,
    model: str,
    backend: str,
    max_seq_length: int,
    tail_tokens: int,
    folds: int,
    fallback_value: float,
    source: str,
    say: Callable[[str], None],
) -> RouterArtifact:
    from coe.router.embed import EmbedderSettings, load_embedder
    from coe.router.train import fit_router

    embedder = load_embedder(
        EmbedderSettings(
            model=model, backend=backend, max_seq_length=max_seq_length, tail_tokens=tail_tokens
        )
    )
    return fit_router(
        rows,
        embedder,
        kind=kind,
        folds=folds,
        fallback_value=fallback_value,  # type: ignore[arg-type]
        source=source,
        report=say,
    )


def _fit_finetuned(
    rows: list[LabelledPrompt],
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
    say: Callable[[str], None],
) -> RouterArtifact:
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


# -- output ----------------------------------------------------------------------------------


def _print_eval(report: EvalReport, name: str) -> None:
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


def _print_frontier(frontier: list[ExpertMap], chosen: ExpertMap, budget: float | None) -> None:
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
