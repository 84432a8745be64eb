"""The base class of self-study seed prompts (paper, section 4.1 and appendix C.1).

A seed prompt is the user message that opens participant A's side of a self-study
conversation: with a chunk of the corpus in the system prompt, it asks A to write the first
user message about that chunk. Seed prompts are generic: they speak of "the document" or "the
corpus" only, never of what the corpus is about, so one set serves every corpus.

Adding a type: write a ``SeedPrompt`` subclass in its own file under ``cart/seeds/`` (a
``name`` and a ``sample`` method) and register it in ``SEED_TYPES`` in
``cart/seeds/__init__.py``. This module imports only the standard library.
"""

from __future__ import annotations

import random

# How every built-in prompt ends, so that A's reply is the message alone, ready to hand to B.
ONLY_THE_MESSAGE = "Output only the message, and nothing else: no preamble, no explanation."
ONLY_THE_QUESTION = "Output only the question, and nothing else: no preamble, no explanation."


class SeedPrompt:
    """One kind of seed prompt. Subclasses set ``name`` and implement ``sample``.

    ``sample`` must draw all its randomness from the ``rng`` it is given, so that the same
    generator state always gives the same prompt.
    """

    name: str = ""
    # A direct seed is the user message itself, sent to B as is (participant A is skipped).
    direct: bool = False

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        """Return the text of one seed prompt of this type about ``chunk``, the text the
        conversation is about (most types do not quote it)."""
        raise NotImplementedError(f"{type(self).__name__}.sample")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DirectSeed(SeedPrompt):
    """A direct seed: one of ``variants``, drawn uniformly, sent to B as the user message."""

    direct = True
    variants: tuple[str, ...] = ()

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        return rng.choice(self.variants)
