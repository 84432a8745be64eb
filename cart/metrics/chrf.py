from __future__ import annotations

from typing import Any

from cart.metrics.base import Metric


class ChrF(Metric):
    """sacrebleu's sentence chrF (character 6-grams, beta 2; MTOB's translation metric) against
    all references, divided by 100 so every score is in [0, 1]."""

    name = "chrf"
    description = "sacrebleu sentence chrF / 100 (MTOB)"

    def __init__(self):
        from sacrebleu.metrics import CHRF

        self._chrf = CHRF()

    def score(self, prediction: str, question: dict[str, Any]) -> float:
        return self._chrf.sentence_score(prediction.strip(), list(question["answers"])).score / 100
