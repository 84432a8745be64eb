"""Summarization seed: A asks for a summary of one clearly identified part of the document.

A new type is added by writing a subclass in its own file and registering it in SEED_TYPES.
"""

from __future__ import annotations

import random

from cart.seeds.base import ONLY_THE_MESSAGE, SeedPrompt

VARIANTS = (
    "Write one chat message that asks an LLM to summarize a particular part of the document "
    "above. The message must say exactly which part it means, and should mention identifying "
    "details (names, titles, identifiers, dates and the like) so there is no doubt about what "
    "is to be summarized. ",
    "Write one chat message that asks an LLM for a summary of one section of the document "
    "above. Be explicit about which section should be summarized and which document it comes "
    "from. ",
)


class SummarizationSeed(SeedPrompt):
    name = "summarization"

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        return rng.choice(VARIANTS) + ONLY_THE_MESSAGE
