"""Mixture-of-prompts (after Wang et al. 2024, "One Prompt is not Enough"): a category's demos are
split into regions of the embedding space; each region keeps its own instruction and its demos,
and a prompt is answered with its nearest region's.

Fitting: the demos' inputs are embedded with the router's embedder and clustered with K-means for
every k up to a limit; k minimises the scaled inertia plus a penalty per region. The inertia is
scaled to the range it spans over the k tried (1 at k=1, 0 at the most), because sentence
embeddings are spread out: three distinct tasks lower the raw inertia by only about 4% a region,
sub-topics by a little less, so a penalty on raw ratios would pick one region or all of them.
Each region's instruction is the candidate closest to its demos in the same embedding space (the
mean cosine similarity to the demos' input and output).
Artifacts are JSON plus a NumPy ``.npz`` read without pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coe.errors import ConfigurationError
from coe.router.base import Embedder

FORMAT = "coe-mixture-of-prompts/1"
META_FILE = "mixture.json"
ARRAYS_FILE = "arrays.npz"
# Going from 1 region to the most tried costs this much, in units of the scaled inertia: a region
# must remove more than its share of the spread that all of them remove.
REGION_PENALTY = 1.0
MAX_REGIONS = 8


class MixtureError(ConfigurationError, ValueError):
    """Demos, candidates or an artifact that cannot make a mixture."""


@dataclass(frozen=True)
class Demo:
    input: str
    output: str


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about four characters a token for English text)."""
    return max(1, math.ceil(len(text) / 4))


def choose_regions(
    x: np.ndarray, *, seed: int = 0, max_regions: int = MAX_REGIONS, penalty: float = REGION_PENALTY
) -> tuple[int, np.ndarray, np.ndarray, list[float]]:
    """K-means for k = 1..max_regions; returns (k, centroids, labels, score per k)."""
    from sklearn.cluster import KMeans

    limit = max(1, min(max_regions, len(x) // 2))
    fits = []
    for k in range(1, limit + 1):
        km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(x)
        fits.append(km)
    first, last = fits[0].inertia_, fits[-1].inertia_
    if limit == 1 or first - last <= 1e-9 * max(first, 1e-12):
        return 1, fits[0].cluster_centers_.astype(np.float32), fits[0].labels_, [0.0]
    scores = [
        float((km.inertia_ - last) / (first - last) + penalty * (k - 1) / (limit - 1))
        for k, km in enumerate(fits, start=1)
    ]
    best = int(np.argmin(scores))
    km = fits[best]
    return best + 1, km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64), scores


@dataclass
class MixtureOfPrompts:
    category: str
    embedder: dict[str, Any]  # model, fingerprint, dim of the embedder it was fitted with
    instructions: list[str]
    centroids: np.ndarray  # (regions, dim)
    demos: list[Demo]
    demo_regions: np.ndarray  # (demos,)
    demo_embeddings: np.ndarray  # (demos, dim)
    scores: list[float]  # the k-selection scores, for the record
    path: Path | None = None

    @property
    def regions(self) -> int:
        return len(self.instructions)

    def region_of(self, embedding: np.ndarray) -> int:
        distances = np.linalg.norm(self.centroids - embedding[None, :], axis=1)
        return int(np.argmin(distances))

    def demos_for(
        self,
        region: int,
        embedding: np.ndarray,
        *,
        token_budget: int,
        max_demos: int,
        count_tokens: Callable[[str], int] = approx_tokens,
    ) -> list[Demo]:
        """The region's demos nearest to the prompt, nearest first, within the token budget."""
        members = np.flatnonzero(self.demo_regions == region)
        distances = np.linalg.norm(self.demo_embeddings[members] - embedding[None, :], axis=1)
        chosen: list[Demo] = []
        spent = 0
        for i in members[np.argsort(distances, kind="stable")]:
            if len(chosen) >= max_demos:
                break
            demo = self.demos[int(i)]
            cost = count_tokens(demo.input) + count_tokens(demo.output)
            if spent + cost > token_budget:
                continue  # a shorter, farther demo may still fit
            chosen.append(demo)
            spent += cost
        return chosen

    # -- files --------------------------------------------------------------------------------
    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "category": self.category,
            "embedder": self.embedder,
            "instructions": self.instructions,
            "demos": [{"input": d.input, "output": d.output} for d in self.demos],
            "scores": self.scores,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        np.savez(
            folder / ARRAYS_FILE,
            centroids=self.centroids,
            demo_regions=self.demo_regions,
            demo_embeddings=self.demo_embeddings,
        )
        return folder


def load_mixture(folder: Path | str) -> MixtureOfPrompts:
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as arrays:
            centroids = arrays["centroids"]
            regions = arrays["demo_regions"]
            embeddings = arrays["demo_embeddings"]
    except (OSError, ValueError, KeyError) as exc:
        raise MixtureError(
            f"{folder}: not a mixture-of-prompts folder ({exc}); build it with "
            "`coe prompts fit DEMOS.jsonl --category NAME --out FOLDER`"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise MixtureError(f"{folder}: format {found!r}, expected {FORMAT!r}")
    try:
        demos = [Demo(str(d["input"]), str(d["output"])) for d in meta["demos"]]
        mixture = MixtureOfPrompts(
            category=str(meta["category"]),
            embedder=dict(meta["embedder"]),
            instructions=[str(i) for i in meta["instructions"]],
            centroids=centroids,
            demos=demos,
            demo_regions=regions,
            demo_embeddings=embeddings,
            scores=[float(x) for x in meta["scores"]],
            path=folder,
        )
        dim = int(mixture.embedder["dim"])
        str(mixture.embedder["fingerprint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MixtureError(f"{folder}: {META_FILE} is incomplete ({exc!r})") from None
    consistent = (
        centroids.ndim == 2
        and centroids.shape == (len(mixture.instructions), dim)
        and embeddings.shape == (len(demos), dim)
        and regions.shape == (len(demos),)
        and len(demos) > 0
        and int(regions.min()) >= 0
        and int(regions.max()) < len(mixture.instructions)
    )
    if not consistent:
        raise MixtureError(f"{folder}: {META_FILE} and {ARRAYS_FILE} do not match")
    return mixture


def read_demos(path: Path) -> list[Demo]:
    """JSONL with one {"input", "output"} object per line."""
    demos = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            demos.append(Demo(str(row["input"]), str(row["output"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise MixtureError(f'{path}:{n}: expected {{"input", "output"}} ({exc})') from None
    if len(demos) < 2:
        raise MixtureError(f"{path}: at least 2 demos are needed, found {len(demos)}")
    return demos


def fit_mixture(
    category: str,
    demos: Sequence[Demo],
    candidates: Sequence[str],
    embedder: Embedder,
    *,
    seed: int = 0,
    max_regions: int = MAX_REGIONS,
    penalty: float = REGION_PENALTY,
) -> MixtureOfPrompts:
    if not candidates:
        raise MixtureError("no candidate instructions: give at least one")
    inputs = embedder.encode([d.input for d in demos])
    k, centroids, labels, scores = choose_regions(
        inputs, seed=seed, max_regions=max_regions, penalty=penalty
    )
    # Each region takes the candidate nearest to what its demos ask and answer.
    pairs = embedder.encode([f"{d.input}\n{d.output}" for d in demos])
    options = embedder.encode(list(candidates))
    instructions = []
    for region in range(k):
        fit = (options @ pairs[labels == region].T).mean(axis=1)
        instructions.append(candidates[int(np.argmax(fit))])
    return MixtureOfPrompts(
        category=category,
        embedder={
            "model": embedder.model_id,
            "fingerprint": embedder.fingerprint,
            "dim": embedder.dim,
        },
        instructions=instructions,
        centroids=centroids,
        demos=list(demos),
        demo_regions=labels,
        demo_embeddings=inputs.astype(np.float32),
        scores=scores,
    )
