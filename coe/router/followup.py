"""Is the latest turn a follow-up or a new task?

"now make it shorter" only makes sense with the conversation before it, so it goes where the
conversation's task went; "ok, different question: prove that √2 is irrational" starts a task of
its own and is routed on its own. A logistic regression on the router's embedding of the turn
tells the two apart; it is fitted on follow-up turns written for it against the router's own
training prompts (each one a standalone task).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

FOLLOWUP = "_followup"  # the label of follow-up turns in training data; never a category

# How people open a new task in the middle of a conversation. Training prompts are written as
# first turns; copies of some of them behind these openers teach the encoder and the detector
# that "ok, different question: ..." is a task of its own, however short.
NEW_TASK_OPENERS: dict[str, tuple[str, ...]] = {
    "en": (
        "ok, different question: ",
        "Different question. ",
        "new topic: ",
        "unrelated, but ",
        "btw, unrelated: ",
        "switching gears: ",
        "Another thing. ",
        "ok next task: ",
        "Thanks! Now something else: ",
        "forget that. ",
        "Moving on. ",
        "One more, separate question: ",
        "ok cool. new one: ",
        "Let's change the subject. ",
        "Also, completely different: ",
    ),
    "de": ("Andere Frage: ", "Neues Thema: ", "Ganz was anderes: "),
    "fr": ("Autre question : ", "Rien à voir, mais ", "Nouveau sujet : "),
    "es": ("Otra pregunta: ", "Cambiando de tema, ", "Nada que ver, pero "),
    "pt": ("Outra pergunta: ", "Mudando de assunto, "),
    "it": ("Altra domanda: ", "Cambiando argomento, "),
    "nl": ("Andere vraag: ",),
    "pl": ("Inne pytanie: ",),
    "ru": ("Другой вопрос: ", "Сменим тему. "),
    "tr": ("Başka bir soru: ",),
    "zh": ("换个问题：", "另外一个问题："),
    "ja": ("別の質問です。", "話は変わりますが、"),
    "ko": ("다른 질문인데요, ",),
}


def with_new_task_opener(prompt: str, lang: str, rng: random.Random) -> str:
    """PROMPT as a new task opened mid-conversation, in its own language where we have one."""
    openers = NEW_TASK_OPENERS.get(lang) or NEW_TASK_OPENERS["en"]
    return rng.choice(openers) + prompt


@dataclass
class FollowupDetector:
    coef: np.ndarray  # (dim,)
    intercept: float
    threshold: float = 0.5

    @classmethod
    def fit(cls, followups: np.ndarray, tasks: np.ndarray, c: float = 1.0) -> FollowupDetector:
        from sklearn.linear_model import LogisticRegression

        x = np.vstack([followups, tasks])
        y = np.r_[np.ones(len(followups)), np.zeros(len(tasks))]
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x, y)
        return cls(coef=model.coef_[0].astype(np.float64), intercept=float(model.intercept_[0]))

    def probability(self, x: np.ndarray) -> np.ndarray:
        """The probability that each embedded turn is a follow-up."""
        return 1.0 / (1.0 + np.exp(-(np.atleast_2d(x) @ self.coef + self.intercept)))

    def is_followup(self, x: np.ndarray) -> np.ndarray:
        return self.probability(x) >= self.threshold

    def describe(self) -> dict[str, Any]:
        return {"kind": "logreg", "threshold": self.threshold}

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "followup_coef": self.coef,
            "followup_intercept": np.array([self.intercept]),
        }

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> FollowupDetector:
        coef = np.asarray(arrays["followup_coef"], dtype=np.float64)
        if coef.ndim != 1:
            raise ValueError("followup_coef must be one row")
        return cls(
            coef=coef,
            intercept=float(arrays["followup_intercept"][0]),
            threshold=float(meta.get("threshold", 0.5)),
        )
