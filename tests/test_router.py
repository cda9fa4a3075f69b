"""The router on the real embedding model: fit/save/load/eval, fallback, multi-turn, safety."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from coe.config import PROJECT_CONFIG, load_config, parse_config
from coe.paths import evaldata_dir
from coe.router.artifact import RouterArtifactError, load_artifact
from coe.router.data import LabelledPrompt, data_hash, read_labelled, split_heldout
from coe.router.embed import EmbedderError, EmbedderSettings, load_embedder
from coe.router.evaluate import evaluate, plot_confusion
from coe.router.router import TwoStageRouter
from coe.router.train import choose_threshold, fit_router
from coe.types import Message

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "routers" / "default"
DATA = SHIPPED / "data"
FOLLOWUPS = SHIPPED / "turns" / "followup.txt"
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
    """The shipped router's own (fine-tuned) encoder."""
    return load_embedder(load_artifact(SHIPPED).embedder_settings())


@pytest.fixture(scope="module")
def base_embedder():
    """The pretrained encoder, for fitting routers of the first kind (no fine-tuning)."""
    return load_embedder(EmbedderSettings())


@pytest.fixture(scope="module")
def split() -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
    """A small, stratified train/held-out split of the shipped training data, English only:
    these tests fit routers of the first kind on the pretrained, English encoder."""
    rows = [r for r in read_labelled(DATA) if r.lang == "en"]
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


def test_fit_save_load_and_evaluate(base_embedder, split, tmp_path: Path) -> None:
    embedder = base_embedder
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


def test_knn_round_trips_too(base_embedder, split, tmp_path: Path) -> None:
    embedder = base_embedder
    train, held = split
    artifact = fit_router(train, embedder, kind="knn")
    artifact.save(tmp_path / "k")
    loaded = load_artifact(tmp_path / "k")
    x = embedder.encode([r.prompt for r in held[:20]])
    np.testing.assert_allclose(
        loaded.classifier.predict_proba(x), artifact.classifier.predict_proba(x)
    )


def test_low_confidence_falls_back(embedder, tmp_path: Path) -> None:
    artifact = load_artifact(SHIPPED)
    cfg = pool_for(CATEGORIES, tmp_path, path=str(SHIPPED), threshold=0.999)
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


def conversation(*turns: str) -> list[Message]:
    """User turns with an assistant answer between each two."""
    out: list[Message] = []
    for i, text in enumerate(turns):
        if i:
            out.append(Message("assistant", "Here you go: ..."))
        out.append(Message("user", text))
    return out


@pytest.fixture(scope="module")
def shipped() -> TwoStageRouter:
    return TwoStageRouter.from_config(load_config(PROJECT_CONFIG))


def test_default_router_keeps_a_follow_up_with_its_task(shipped: TwoStageRouter) -> None:
    first = "Write a Python function that merges two sorted lists"
    assert shipped.route([Message("user", first)]).category == "coding"
    assert shipped.tells_followups
    for follow_up in ("now make it shorter", "add type hints", "why?", "und auf Deutsch?"):
        decision = shipped.route(conversation(first, follow_up))
        assert decision.category == "coding" and decision.expert == "coder", follow_up
        assert decision.continues and "follow-up" in decision.reason
    poem = conversation("a short poem about my cat", "make it rhyme better", "now shorter")
    assert shipped.route(poem).category == "writing"


def test_default_router_routes_a_new_task_on_its_own(shipped: TwoStageRouter) -> None:
    code = "Write a Python function that merges two sorted lists"
    switched = shipped.route(
        conversation(code, "ok, different question: prove that √2 is irrational")
    )
    assert switched.category == "math" and not switched.continues
    assert "new task" in switched.reason
    poem = shipped.route(
        conversation(code, "thanks! now something else: a haiku about autumn rain")
    )
    assert poem.category == "writing" and not poem.continues
    assert switched.latency_s > 0


def test_shipped_router_is_accurate_on_its_heldout_split(shipped: TwoStageRouter) -> None:
    """The split the fit never trained on, embedded again here: accuracy and calibration."""
    artifact = shipped.artifact
    _, held = split_heldout(read_labelled(DATA), artifact.metrics["heldout_fraction"])
    assert len(held) == artifact.metrics["heldout_n"] > 400
    report = evaluate(shipped, held)
    assert report.accuracy >= 0.85, report.per_category
    assert report.coarse_accuracy >= report.accuracy
    assert report.ece <= 0.08
    long_rows = [r for r in held if len(r.prompt) >= 300]
    assert evaluate(shipped, long_rows).accuracy >= 0.8


def test_router_built_on_another_embedding_model_is_refused(tmp_path: Path, embedder) -> None:
    folder = tmp_path / "r"
    artifact = load_artifact(SHIPPED)
    artifact.embedder = {**artifact.embedder, "fingerprint": "0000000000000000"}
    artifact.save(folder)
    with pytest.raises(RouterArtifactError, match="refit"):
        TwoStageRouter(load_artifact(folder), embedder, pool_for(CATEGORIES, tmp_path))


def test_router_with_categories_missing_from_experts_yaml_is_refused(tmp_path, embedder) -> None:
    artifact = load_artifact(SHIPPED)
    with pytest.raises(RouterArtifactError, match=r"lacks: .*roleplay"):
        TwoStageRouter(artifact, embedder, pool_for(["writing", "coding"], tmp_path))


def test_the_shipped_encoder_cannot_be_run_on_torch() -> None:
    settings = load_artifact(SHIPPED).embedder_settings(backend="torch")
    with pytest.raises(EmbedderError, match="onnx-int8"):
        load_embedder(settings)


def test_router_weights_hold_no_pickled_objects(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "router.json").write_text((SHIPPED / "router.json").read_text())
    np.savez(folder / "weights.npz", coef=np.array([object()], dtype=object))
    with pytest.raises(RouterArtifactError, match="damaged"):
        load_artifact(folder)


def test_shipped_router_was_fitted_on_the_shipped_data() -> None:
    artifact = load_artifact(SHIPPED)
    rows = read_labelled(DATA)
    assert artifact.training["sha256"] == data_hash(rows)
    counts = {c: sum(r.category == c for r in rows) for c in CATEGORIES}
    assert min(counts.values()) >= 400 and len(rows) >= 4000, counts
    assert sum(300 <= len(r.prompt) <= 3000 for r in rows) >= 0.45 * len(rows)
    assert sum(r.lang != "en" for r in rows) >= 0.14 * len(rows)
    assert artifact.training["followups"] == len(read_labelled_followups())
    graph = SHIPPED / "encoder" / "model.int8.onnx"
    assert graph.stat().st_size < 30 * 2**20


def read_labelled_followups() -> list[str]:
    return [r.prompt for r in read_labelled(FOLLOWUPS)]


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


def _readable(texts: list[str]) -> np.ndarray:
    """Which texts the English embedding model reads as words: mostly Latin letters. It cuts
    other scripts (Hangul, Thai, ...) into a few pieces that make unrelated texts look alike."""

    def latin(text: str) -> bool:
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and sum(ord(c) < 0x250 for c in letters) >= 0.5 * len(letters)

    return np.array([latin(t) for t in texts])


def _worst_pair(similarity: np.ndarray, train: list[str], evals: list[str]) -> str:
    i, j = np.unravel_index(similarity.argmax(), similarity.shape)
    return f"{train[i][:80]!r} ~ {evals[j][:80]!r} ({similarity[i, j]:.3f})"


def test_no_training_prompt_is_a_near_duplicate_of_an_evaluation_prompt() -> None:
    """Two checks over the training prompts and follow-up turns against MT-Bench and both
    Arena-Hard versions: meaning (sentence embeddings, for texts the model can read) and
    wording (character 5-grams, any script)."""
    train = [r.prompt for r in read_labelled(DATA)] + read_labelled_followups()
    evals = _eval_prompts()
    assert len(evals) > 1000
    # Longer windows than the router's, start only: a near-copy must not hide in the middle.
    embedder = load_embedder(EmbedderSettings(max_seq_length=128, tail_tokens=0))
    t_ok, e_ok = _readable(train), _readable(evals)
    assert t_ok.mean() > 0.5 and e_ok.mean() > 0.8
    meaning = embedder.encode(train) @ embedder.encode(evals).T
    meaning[~t_ok] = 0.0
    meaning[:, ~e_ok] = 0.0
    assert meaning.max() <= 0.9, f"near-duplicate in meaning: {_worst_pair(meaning, train, evals)}"
    wording = _wording_similarity(train, evals)
    assert wording.max() <= 0.5, f"near-duplicate in wording: {_worst_pair(wording, train, evals)}"


def test_the_test_set_was_written_apart_from_the_training_data() -> None:
    train = [r.prompt for r in read_labelled(DATA)]
    test = [r.prompt for r in read_labelled(SHIPPED / "test")]
    assert len(test) >= 270
    wording = _wording_similarity(train, test)
    assert wording.max() < 0.35, (
        f"test prompt close to training: {_worst_pair(wording, train, test)}"
    )


def _wording_similarity(a: list[str], b: list[str]) -> np.ndarray:
    """Jaccard similarity of the texts' five-character pieces, A's rows against B's."""
    from sklearn.feature_extraction.text import CountVectorizer

    shingles = CountVectorizer(analyzer=_shingles, binary=True, dtype=np.float32)
    sets = shingles.fit_transform(a + b)
    a_sets, b_sets = sets[: len(a)], sets[len(a) :]
    shared = (a_sets @ b_sets.T).toarray()
    sizes = np.asarray(a_sets.sum(1)), np.asarray(b_sets.sum(1)).T
    similarity = shared / np.maximum(sizes[0] + sizes[1] - shared, 1.0)
    # Two short texts share their few pieces by chance ("is 1001 prime", "is 2^61-1 prime").
    similarity[(sizes[0] < 20) | (sizes[1] < 20)] = 0.0
    return similarity


def _shingles(text: str) -> list[str]:
    """Five-character pieces of a text with spaces collapsed, those of three letters or more
    (a table's dashes or a log's digits are shared by unrelated texts)."""
    flat = " ".join(text.lower().split())
    pieces = (flat[i : i + 5] for i in range(len(flat) - 4))
    return [p for p in pieces if sum(c.isalpha() for c in p) >= 3]
