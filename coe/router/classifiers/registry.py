"""Every classifier kind by name: the one place a new kind is added."""

from __future__ import annotations

from typing import TYPE_CHECKING

from coe.router.classifiers.knn import NearestNeighboursClassifier
from coe.router.classifiers.logreg import LogisticRegressionClassifier

if TYPE_CHECKING:
    from coe.router.base import Classifier

# The name is router.json's classifier.kind and a choice of `coe router fit --kind`; renaming
# one makes routers saved under the old name unloadable.
CLASSIFIERS: dict[str, type[Classifier]] = {
    "logreg": LogisticRegressionClassifier,
    "knn": NearestNeighboursClassifier,
}


def classifier_kind(name: str) -> type[Classifier]:
    try:
        return CLASSIFIERS[name]
    except KeyError:
        raise ValueError(
            f"unknown classifier kind {name!r} (known: {', '.join(CLASSIFIERS)})"
        ) from None
