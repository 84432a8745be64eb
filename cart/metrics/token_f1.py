from __future__ import annotations

from collections import Counter
from typing import Any

from cart.metrics.base import Metric, normalize


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class TokenF1(Metric):
    """Bag-of-words F1 between normalized prediction and reference, best over the references
    (SQuAD / QASPER answer F1)."""

    name = "token_f1"
    description = "token-overlap F1 with the best reference (QASPER)"

    def score(self, prediction: str, question: dict[str, Any]) -> float:
        return max(token_f1(prediction, a) for a in question["answers"])
