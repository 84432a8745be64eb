from __future__ import annotations

from typing import Any

from cart.metrics.base import Metric


class LogLikelihood(Metric):
    """No generated answer: the question is measured by the teacher-forced log-likelihood of
    its reference answer only (mean NLL per token and perplexity; QASPER's measure in the
    paper). Every question gets that measure whatever its metric; this one skips generation."""

    name = "loglik"
    generates = False
    description = "reference-answer likelihood only (no generation)"

    def score(self, prediction: str, question: dict[str, Any]) -> None:
        return None
