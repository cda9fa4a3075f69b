"""Scores of finished runs: per system and category, what each system costs in active
parameters, and the per-category expert table that ``coe router map --scores`` reads.

Average active parameters of a system = the sum over its requests of the answering expert's
parameter count (``params:`` in experts.yaml, recorded with each answer), divided by the number
of requests: the Composition-of-Experts paper's cost axis.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coe.evals import arena_hard, mt_bench
from coe.evals.run import MT_BENCH, ArenaHardTask, MTBenchTask, RunError, RunFolder, last_per_key
from coe.router.data import arena_hard_category


@dataclass
class Run:
    path: Path
    meta: dict[str, Any]
    answers: list[dict[str, Any]]
    judgments: list[dict[str, Any]]

    @property
    def benchmark(self) -> str:
        return str(self.meta["benchmark"])


def load_run(path: Path) -> Run:
    """A run's rows, one per item: where an item was redone, its last row counts."""
    folder = RunFolder(path)
    meta = folder.meta()
    task = MTBenchTask if meta.get("benchmark") == MT_BENCH else ArenaHardTask
    answers = last_per_key(folder.answers(), task.answer_key)
    judgments = last_per_key(folder.judgments(), task.judgment_key)
    return Run(path, meta, answers, judgments)


def _system_of(answer: dict[str, Any]) -> str:
    return str(answer.get("model_id") or answer.get("model"))


def _category_of(answer: dict[str, Any]) -> str:
    if "question_id" in answer:
        return str(answer["category"])
    return arena_hard_category(str(answer.get("subcategory") or answer["category"]))


def usage(answers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: requests, average active parameters, answer errors, latency, tokens,
    and how often each expert answered."""
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "params": 0, "unknown_params": 0, "errors": 0, "latency_s": 0.0,
                 "completion_tokens": 0, "experts": defaultdict(int)}
    )  # fmt: skip
    for answer in answers:
        u = per[_system_of(answer)]
        for r in answer.get("requests", []):
            u["requests"] += 1
            u["experts"][str(r.get("expert"))] += 1
            if r.get("params") is None:
                u["unknown_params"] += 1
            else:
                u["params"] += int(r["params"])
            u["errors"] += 1 if r.get("error") else 0
            u["latency_s"] += float(r.get("latency_s") or 0.0)
            u["completion_tokens"] += int(r.get("completion_tokens") or 0)
    out = {}
    for system, u in per.items():
        n = u["requests"] or 1
        known = u["requests"] - u["unknown_params"]
        out[system] = {
            "requests": u["requests"],
            "avg_active_params": round(u["params"] / known) if known else None,
            "requests_without_params": u["unknown_params"],
            "answer_errors": u["errors"],
            "mean_latency_s": round(u["latency_s"] / n, 3),
            "mean_completion_tokens": round(u["completion_tokens"] / n, 1),
            "experts": dict(sorted(u["experts"].items())),
        }
    return out


def score_run(run: Run, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per system: the benchmark's scores (``score`` is the headline number) and its usage."""
    costs = usage(run.answers)
    if run.benchmark == MT_BENCH:
        categories = {int(a["question_id"]): str(a["category"]) for a in run.answers}
        scores = mt_bench.score_judgments(run.judgments, categories)
        for s in scores.values():
            s["score"] = s["overall"]
    else:
        scores = arena_hard.score_judgments(run.judgments, seed)
        for s in scores.values():
            # v0.1 reads its Bradley-Terry win rate, v2.0 its mean win rate (each as upstream).
            headline = s["bradley_terry"] if run.benchmark.endswith("v0.1") else s["win_rate"]
            s["score"] = headline["score"] if headline else None
            s["categories"] = {arena_hard_category(c): v for c, v in s["categories"].items()}
    return {
        system: {**scores.get(system, {"score": None}), **costs.get(system, {})}
        for system in sorted(set(scores) | set(costs))
    }


def summarize(runs: list[Run], seed: int = 0) -> dict[str, Any]:
    """{benchmark: {system: scores and usage}}; a system in several runs of one benchmark
    is an error (which would it be?)."""
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for run in runs:
        for system, figures in score_run(run, seed).items():
            if system in out[run.benchmark]:
                raise RunError(f"{system} appears in two {run.benchmark} runs; report them apart")
            out[run.benchmark][system] = {**figures, "run": str(run.path)}
    return dict(out)


def expert_scores(runs: list[Run], experts: list[str], seed: int = 0) -> dict[str, Any]:
    """``{"benchmark", "scores": {expert: {category: score}}, "frequencies": {category: n}}``
    from the single-expert systems of runs of one benchmark."""
    benchmarks = {r.benchmark for r in runs}
    if len(benchmarks) != 1:
        raise RunError(f"scores mix benchmarks ({', '.join(sorted(benchmarks))}): pass one")
    benchmark = benchmarks.pop()
    if benchmark.endswith("v0.1"):
        raise RunError(
            "Arena-Hard v0.1 puts every prompt in one category: score experts per category "
            "with MT-Bench or Arena-Hard v2.0 runs"
        )
    summary = summarize(runs, seed)[benchmark]
    measured = [e for e in experts if e in summary]
    if not measured:
        raise RunError(
            "no single-expert system in these runs: run the benchmark with --system <expert> "
            "for each expert to score them"
        )
    scores = {
        e: {c: v for c, v in summary[e].get("categories", {}).items() if v is not None}
        for e in measured
    }
    scores = {e: per for e, per in scores.items() if per}
    if not scores:
        raise RunError(
            f"no rated answers for {', '.join(measured)}: every judgment was unparseable "
            "(see `coe eval report`); a stronger judge is needed"
        )
    # Only categories some expert has a score in: `coe router map` weighs scores by these.
    scored = {c for per in scores.values() for c in per}
    frequencies: dict[str, int] = defaultdict(int)
    seen = set()
    for run in runs:
        for a in run.answers:
            key = (a.get("question_id") or a.get("uid"), _category_of(a))
            if key not in seen and key[1] in scored:
                seen.add(key)
                frequencies[key[1]] += 1
    return {
        "benchmark": runs[0].benchmark,
        "scores": scores,
        "frequencies": dict(sorted(frequencies.items())),
    }


# -- writing the report ----------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _params(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f}M"


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# coe eval report", ""]
    for benchmark, systems in summary.items():
        lines += [f"## {benchmark}", ""]
        # Arena-Hard v2.0: hard_prompt is the score; creative_writing gets a column of its own.
        beside = sorted(
            {a for s in systems.values() for a in s.get("arena_categories") or {}}
            - {arena_hard.HEADLINE_CATEGORY, arena_hard.LEGACY_CATEGORY}
        )
        if benchmark == MT_BENCH:
            head = ["system", "score", "turn 1", "turn 2"]
        else:
            head = ["system", "score", "90% CI (v2.0)", *beside, "BT score", "95% CI (BT)"]
        head += ["avg active params", "requests", "unparseable", "answer errors"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, s in systems.items():
            row = [name, _fmt(s.get("score"))]
            if benchmark == MT_BENCH:
                row += [_fmt(s.get("turn_1")), _fmt(s.get("turn_2"))]
            else:
                wr, bt = s.get("win_rate") or {}, s.get("bradley_terry") or {}
                arenas = s.get("arena_categories") or {}
                row += [
                    "-" if not wr.get("ci") else f"{_fmt(wr['ci'][0])} to {_fmt(wr['ci'][1])}",
                    *(_fmt((arenas.get(a) or {}).get("score")) for a in beside),
                    _fmt(bt.get("score")),
                    "-" if not bt.get("ci") else f"{_fmt(bt['ci'][0])} to {_fmt(bt['ci'][1])}",
                ]
            row += [
                _params(s.get("avg_active_params")),
                _fmt(s.get("requests")),
                _fmt(s.get("unparseable")),
                _fmt(s.get("answer_errors")),
            ]
            lines.append("| " + " | ".join(row) + " |")
        categories = sorted({c for s in systems.values() for c in s.get("categories", {})})
        if categories:
            lines += ["", "Per category:", ""]
            lines += ["| system | " + " | ".join(categories) + " |"]
            lines += ["|" + "---|" * (len(categories) + 1)]
            for name, s in systems.items():
                per = s.get("categories", {})
                lines.append(
                    f"| {name} | " + " | ".join(_fmt(per.get(c)) for c in categories) + " |"
                )
        lines.append("")
    lines += [
        "Unparseable: judgments without a rating (MT-Bench, left out of the mean) or answers "
        "with a game without a verdict (Arena-Hard, left out of the score). Arena-Hard v2.0's "
        "score is its hard_prompt win rate; creative_writing, judged against another baseline, "
        "is shown beside it, never pooled (as upstream).",
        "",
    ]
    return "\n".join(lines)


def plot_categories(summary: dict[str, Any], path: Path) -> None:
    """Per-category scores, one group of bars per category, one bar per system."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(summary), 1, figsize=(10, 4 * len(summary)), squeeze=False)
    for ax, (benchmark, systems) in zip(axes[:, 0], summary.items(), strict=True):
        categories = sorted({c for s in systems.values() for c in s.get("categories", {})})
        ax.set_title(f"{benchmark}: score per category")
        if not categories:
            _nothing_rated(ax)
            continue
        width = 0.8 / max(1, len(systems))
        for i, (name, s) in enumerate(systems.items()):
            values = [s.get("categories", {}).get(c) or 0.0 for c in categories]
            ax.bar([x + i * width for x in range(len(categories))], values, width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(categories))], categories)
        ax.set_ylabel("score (1-10)" if benchmark == MT_BENCH else "win rate vs baseline (%)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(summary: dict[str, Any], path: Path) -> None:
    """Average active parameters against score, one point per system; the line joins the
    systems no other system beats on both (the Pareto frontier)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5), squeeze=False)
    for ax, (benchmark, systems) in zip(axes[0], summary.items(), strict=True):
        points = [
            (s["avg_active_params"] / 1e9, s["score"], name)
            for name, s in systems.items()
            if s.get("avg_active_params") is not None and s.get("score") is not None
        ]
        ax.set_title(f"{benchmark}: score vs cost")
        if not points:
            _nothing_rated(ax)
            continue
        for x, y, name in points:
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
        frontier, best = [], float("-inf")
        for x, y, _ in sorted(points, key=lambda p: (p[0], -p[1])):
            if y > best:
                frontier.append((x, y))
                best = y
        if len(frontier) > 1:
            ax.plot(*zip(*frontier, strict=True), linestyle="--", color="grey")
        ax.set_xlabel("average active parameters (billions)")
        ax.set_ylabel("score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nothing_rated(ax: Any) -> None:
    """An empty panel says why: every judgment of this benchmark was unparseable."""
    ax.text(0.5, 0.5, "no rated judgments\n(see the unparseable counts)", ha="center",
            va="center", transform=ax.transAxes)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(runs: list[Run], out: Path, seed: int = 0) -> dict[str, Path]:
    """report.md, report.json, categories.png and pareto.png in ``out``."""
    summary = summarize(runs, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "report.md",
        "json": out / "report.json",
        "categories": out / "categories.png",
        "pareto": out / "pareto.png",
    }
    paths["markdown"].write_text(markdown(summary))
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot_categories(summary, paths["categories"])
    plot_pareto(summary, paths["pareto"])
    return paths
