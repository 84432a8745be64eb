"""Generic seed: the single broad prompt of the paper's seed-prompt ablation (section 5.3),
used instead of the five types with ``--seed-prompts generic``.

A new type is added by writing a subclass in its own file and registering it in SEED_TYPES.
"""

from __future__ import annotations

import random

from cart.seeds.base import ONLY_THE_MESSAGE, SeedPrompt

PROMPT = (
    "Write one chat message that opens a conversation about the information in the document "
    "above, by asking a question about it or making a request concerning it. "
    + ONLY_THE_MESSAGE
)


class GenericSeed(SeedPrompt):
    name = "generic"

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        return PROMPT
