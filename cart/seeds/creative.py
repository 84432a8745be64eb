"""Creative seed: A opens an imaginative conversation inspired by the document.

A new type is added by writing a subclass in its own file and registering it in SEED_TYPES.
"""

from __future__ import annotations

import random

from cart.seeds.base import ONLY_THE_QUESTION, SeedPrompt

PROMPT = (
    "You are about to have an imaginative, open-ended conversation that draws its inspiration "
    "from the information in the document above. Write the question you would ask your "
    "conversation partner to get the discussion going. " + ONLY_THE_QUESTION
)


class CreativeSeed(SeedPrompt):
    name = "creative"

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        return PROMPT
