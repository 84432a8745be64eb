"""The metric interface: one class per file, registered by name in ``cart.metrics``."""

from __future__ import annotations

import re
import string
from typing import Any, ClassVar


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style answer normalization: lower case, no punctuation, no articles, single
    spaces -- so "The Saltmarsh Heron." and "saltmarsh heron" compare equal."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


class Metric:
    """Scores one prediction against a question's reference answers, in [0, 1].

    ``generates = False`` marks a metric that needs no generated answer (the reference
    answer's likelihood, which every question gets anyway)."""

    name: ClassVar[str]
    generates: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def check(self, question: dict[str, Any], where: str) -> None:
        """Refuse a question this metric cannot score (``where`` = FILE:LINE)."""

    def score(self, prediction: str, question: dict[str, Any]) -> float | None:
        raise NotImplementedError

