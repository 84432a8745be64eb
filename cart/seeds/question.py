"""Question seed: A asks one question that checks knowledge of the document, with enough
identifying detail to be answerable without the document at hand.

A new type is added by writing a subclass in its own file and registering it in SEED_TYPES.
"""

from __future__ import annotations

import random

from cart.seeds.base import ONLY_THE_QUESTION, SeedPrompt

VARIANTS = (
    "Write a question for an LLM that checks whether it knows the information in the document "
    "above. Put identifying details (names, titles, identifiers, dates and so on) into the "
    "question so that it is clear what is being asked about. ",
    "Write a question for an LLM that checks what it knows about the information in the "
    "document above. Include identifying details (names, titles, identifiers, dates and so on) "
    "so that the question can be answered by someone who cannot see the document. ",
    "You are quizzing someone on the information in the document above. Write one question "
    "about the section shown, with identifying details (names, titles, identifiers, dates and "
    "so on) that make clear what it is about. ",
)


class QuestionSeed(SeedPrompt):
    name = "question"

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        return rng.choice(VARIANTS) + ONLY_THE_QUESTION
