"""Use-case seed: A imagines practical tasks that the document would help with, then asks the
kind of question or request a user working on such a task would make.

A new type is added by writing a subclass in its own file and registering it in SEED_TYPES.
"""

from __future__ import annotations

import random

from cart.seeds.base import SeedPrompt

PROMPT = (
    "You are helping to teach a language model the information in the document above. "
    "First consider what practical, real-world tasks a person could carry out with the "
    "knowledge in this document, thinking of how they would put it to use rather than merely "
    "recall it. Then write one question, instruction or request that such a person, with the "
    "document at hand, might make while working towards one of those goals. "
    "Output only that question or request, and nothing else: no preamble, no explanation."
)


class UseCaseSeed(SeedPrompt):
    name = "use_case"

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        return PROMPT
