"""Q&A seed (direct): the user asks the teacher to write questions the document answers,
each with its answer.

Sent verbatim as the user message (see ``recite.py``): the *teacher*, with the chunk in view,
writes the questions, instead of participant A generating one it often cannot ground.
"""

from __future__ import annotations

from cart.seeds.base import DirectSeed

VARIANTS = (
    "Write questions that the document above answers, each followed by its answer taken "
    "from the document.",
    "Quiz me on the document above: write several questions about its specific details, and "
    "give the correct answer after each one.",
    "Write a list of question and answer pairs covering the details of the document above.",
)


class QASeed(DirectSeed):
    name = "qa"
    variants = VARIANTS
