from __future__ import annotations

import re
import string
from typing import Any

from cart.io import CartError
from cart.metrics.base import Metric, normalize

_MARKUP = re.compile(r"[*_`#]+")


def extract_choice(prediction: str, choices: list[str]) -> str | None:
    """The option letter a free-form reply picks, or None. Tolerant to formatting the way the
    LongHealth protocol is: an explicit "answer is (C)" / "Answer: C" wins; then a reply that
    starts with the letter ("C", "C.", "(C)", "C) ..."); then the one option whose text the
    reply quotes (the earliest, if several); then a lone parenthesized or bare letter (never a
    bare "A", which is usually the article)."""
    letters = string.ascii_uppercase[: len(choices)]
    text = _MARKUP.sub("", prediction).strip()
    cls = f"[{letters}]"
    m = re.search(rf"\b(?i:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*\(?({cls})\b(?![a-z'])", text)
    if m:
        return m.group(1)
    m = re.match(rf"\(?({cls})(?:[\).:\]]|\s*$|\s+-)", text)
    if m:
        return m.group(1)
    pred = f" {normalize(text)} "
    found = [(pred.find(f" {normalize(c)} "), i) for i, c in enumerate(choices) if normalize(c)]
    found = [(pos, i) for pos, i in found if pos >= 0]
    if found:
        return letters[min(found)[1]]
    m = re.search(rf"\(({cls})\)|\b({cls.replace('A', '')})\b(?![a-z'])" if len(letters) > 1 else
                  rf"\(({cls})\)", text)
    if m:
        return m.group(1) or m.group(2)
    return None


class MultipleChoice(Metric):
    """1 if the option the reply picks (``extract_choice``) is the reference letter."""

    name = "multiple_choice"
    description = "extracted option letter equals the reference letter"

    def check(self, question: dict[str, Any], where: str) -> None:
        choices = question.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise CartError(f"{where}: field 'choices' must list at least two options (strings) "
                            f"for metric multiple_choice")
        if len(choices) > 26:
            raise CartError(f"{where}: field 'choices' has {len(choices)} options; at most 26")
        gold = str(question["answers"][0]).strip().upper()
        letters = string.ascii_uppercase[: len(choices)]
        if len(gold) != 1 or gold not in letters:
            raise CartError(f"{where}: field 'answers' must hold the letter of the correct option "
                            f"({letters[0]}-{letters[-1]}), got {question['answers'][0]!r}")

    def score(self, prediction: str, question: dict[str, Any]) -> float:
        gold = str(question["answers"][0]).strip().upper()
        return float(extract_choice(prediction, question["choices"]) == gold)
