from __future__ import annotations

from typing import Any

from cart.metrics.base import Metric, normalize


class Contains(Metric):
    """1 if the normalized prediction contains any normalized reference answer (aliases such
    as a surname are extra answers). The default metric: small models answer in sentences."""

    name = "contains"
    description = "normalized prediction contains a reference answer"

    def score(self, prediction: str, question: dict[str, Any]) -> float:
        pred = f" {normalize(prediction)} "
        return float(any(f" {normalize(a)} " in pred for a in question["answers"] if normalize(a)))
