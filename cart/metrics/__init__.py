"""Evaluation metrics, one class per file (like seed-prompt types). ``cart.questions/1``
records name theirs in ``metric``; ``METRICS`` maps names to classes."""

from __future__ import annotations

from cart.metrics.base import Metric, normalize
from cart.metrics.chrf import ChrF
from cart.metrics.contains import Contains
from cart.metrics.exact import ExactMatch
from cart.metrics.loglik import LogLikelihood
from cart.metrics.multiple_choice import MultipleChoice, extract_choice
from cart.metrics.token_f1 import TokenF1, token_f1

METRICS: dict[str, type[Metric]] = {m.name: m for m in (
    Contains, ExactMatch, MultipleChoice, TokenF1, ChrF, LogLikelihood)}

__all__ = ["METRICS", "Metric", "extract_choice", "normalize", "token_f1"]
