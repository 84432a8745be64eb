from __future__ import annotations

from typing import Any

from cart.metrics.base import Metric, normalize


class ExactMatch(Metric):
    """1 if the normalized prediction equals a normalized reference answer (SQuAD's EM)."""

    name = "exact"
    description = "normalized prediction equals a reference answer"

    def score(self, prediction: str, question: dict[str, Any]) -> float:
        pred = normalize(prediction)
        return float(any(pred == normalize(a) for a in question["answers"]))
