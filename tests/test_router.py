"""The router on the real embedding model: fit/save/load/eval, fallback, multi-turn, safety."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from coe.config import PROJECT_CONFIG, load_config, parse_config
from coe.engines.base import Message
from coe.paths import evaldata_dir
from coe.router.artifact import RouterArtifactError, load_artifact
from coe.router.data import LabelledPrompt, data_hash, read_labelled
from coe.router.embed import EmbedderSettings, load_embedder
from coe.router.evaluate import evaluate, plot_confusion
from coe.router.router import TwoStageRouter
from coe.router.train import choose_threshold, fit_router

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "routers" / "default" / "train.jsonl"
CATEGORIES = [
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(load_artifact(ROOT / "routers" / "default").embedder_settings())


@pytest.fixture(scope="module")
def split() -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
    """A small, stratified train/held-out split of the shipped training data."""
    rows = read_labelled(TRAIN)
    rng = random.Random(0)
    train, held = [], []
    for cat in CATEGORIES:
        mine = [r for r in rows if r.category == cat]
        rng.shuffle(mine)
        train += mine[:25]
        held += mine[25:40]
    return train, held


def pool_for(categories: list[str], tmp_path: Path, **router: object):
    data = {
        "experts": [{"name": "solo", "model": "coe:gemma-3-270m"}],
        "categories": [{"name": c, "expert": "solo"} for c in [*categories, "general"]],
        "router": router,
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_config(data, path)


def test_fit_save_load_and_evaluate(embedder, split, tmp_path: Path) -> None:
    train, held = split
    artifact = fit_router(train, embedder, source="subset")
    assert artifact.categories == sorted(CATEGORIES)
    assert 0 < artifact.threshold < 1
    assert artifact.training["sha256"] == data_hash(train)
    artifact.save(tmp_path / "r")
    loaded = load_artifact(tmp_path / "r")
    x = embedder.encode([r.prompt for r in held])
    np.testing.assert_allclose(
        loaded.classifier.predict_proba(x), artifact.classifier.predict_proba(x), atol=1e-9
    )
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    assert meta["embedder"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert set(meta["metrics"]) >= {"cv_accuracy", "cv_macro_f1"}

    router = TwoStageRouter(loaded, embedder, pool_for(CATEGORIES, tmp_path))
    report = evaluate(router, held)
    assert report.n == len(held)
    assert report.accuracy > 0.6  # 25 examples a category; chance is 0.125
    assert set(report.per_category) == set(CATEGORIES)
    assert sum(map(sum, report.confusion)) == len(held)
    png = plot_confusion(report, tmp_path / "confusion.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_knn_round_trips_too(embedder, split, tmp_path: Path) -> None:
    train, held = split
    artifact = fit_router(train, embedder, kind="knn")
    artifact.save(tmp_path / "k")
    loaded = load_artifact(tmp_path / "k")
    x = embedder.encode([r.prompt for r in held[:20]])
    np.testing.assert_allclose(
        loaded.classifier.predict_proba(x), artifact.classifier.predict_proba(x)
    )


def test_low_confidence_falls_back(embedder, tmp_path: Path) -> None:
    artifact = load_artifact(ROOT / "routers" / "default")
    cfg = pool_for(CATEGORIES, tmp_path, path=str(ROOT / "routers" / "default"), threshold=0.999)
    router = TwoStageRouter(artifact, embedder, cfg, threshold=cfg.router.threshold)
    decision = router.route([Message("user", "hmm, what do you think about this one?")])
    assert decision.fell_back and decision.category == "general"
    assert decision.confidence is not None and decision.confidence < 0.999
    assert decision.alternatives[0][0] in CATEGORIES  # the best guess is still reported


def test_threshold_choice_trades_wrong_answers_for_fallbacks() -> None:
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([0, 0, 1, 1])  # the last prediction is wrong, at confidence 0.55
    assert choose_threshold(proba, y, fallback_value=0.5) == pytest.approx(0.6)
    assert choose_threshold(proba, y, fallback_value=0.0) == 0.0  # fallbacks worth nothing


def test_default_router_routes_and_stays_with_the_conversation() -> None:
    router = TwoStageRouter.from_config(load_config(PROJECT_CONFIG))
    first = "Write a Python function that merges two sorted lists"
    assert router.route([Message("user", first)]).category == "coding"
    follow_up = [
        Message("user", first),
        Message("assistant", "def merge(a, b): ..."),
        Message("user", "now make it shorter"),
    ]
    assert router.route([Message("user", "now make it shorter")]).category != "coding"
    decision = router.route(follow_up)
    assert decision.category == "coding" and decision.expert == "coder"
    assert decision.latency_s > 0


def test_router_built_on_another_embedding_model_is_refused(tmp_path: Path, embedder) -> None:
    folder = tmp_path / "r"
    artifact = load_artifact(ROOT / "routers" / "default")
    artifact.embedder = {**artifact.embedder, "fingerprint": "0000000000000000"}
    artifact.save(folder)
    with pytest.raises(RouterArtifactError, match="refit"):
        TwoStageRouter(load_artifact(folder), embedder, pool_for(CATEGORIES, tmp_path))


def test_router_with_categories_missing_from_experts_yaml_is_refused(tmp_path, embedder) -> None:
    artifact = load_artifact(ROOT / "routers" / "default")
    with pytest.raises(RouterArtifactError, match=r"lacks: .*roleplay"):
        TwoStageRouter(artifact, embedder, pool_for(["writing", "coding"], tmp_path))


def test_router_weights_hold_no_pickled_objects(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "router.json").write_text((ROOT / "routers" / "default" / "router.json").read_text())
    np.savez(folder / "weights.npz", coef=np.array([object()], dtype=object))
    with pytest.raises(RouterArtifactError, match="damaged"):
        load_artifact(folder)


def test_shipped_router_was_fitted_on_the_shipped_data() -> None:
    artifact = load_artifact(ROOT / "routers" / "default")
    rows = read_labelled(TRAIN)
    assert artifact.training["sha256"] == data_hash(rows)
    counts = {c: sum(r.category == c for r in rows) for c in CATEGORIES}
    assert min(counts.values()) >= 60, counts


def _eval_prompts() -> list[str]:
    root = evaldata_dir()
    assert root.is_dir(), f"the evaluation sets are missing at {root} (set COE_EVALDATA)"
    prompts = []
    for line in (root / "mt_bench" / "question.jsonl").read_text().split("\n"):
        if line.strip():
            prompts += json.loads(line)["turns"]
    for version in ("v0.1", "v2.0"):
        for line in (root / "arena_hard" / version / "question.jsonl").read_text().split("\n"):
            if line.strip():
                row = json.loads(line)
                prompts.append(row.get("prompt") or row["turns"][0]["content"])
    return prompts


def test_no_training_prompt_is_a_near_duplicate_of_an_evaluation_prompt() -> None:
    # Longer windows than the router's, start only: a near-copy must not hide in the middle.
    embedder = load_embedder(EmbedderSettings(max_seq_length=128, tail_tokens=0))
    train = [r.prompt for r in read_labelled(TRAIN)]
    evals = _eval_prompts()
    assert len(evals) > 1000
    similarity = embedder.encode(train) @ embedder.encode(evals).T
    worst = np.unravel_index(similarity.argmax(), similarity.shape)
    assert similarity.max() <= 0.9, (
        f"training prompt {train[worst[0]][:80]!r} is a near-duplicate "
        f"({similarity.max():.3f}) of evaluation prompt {evals[worst[1]][:80]!r}"
    )
