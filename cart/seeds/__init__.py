"""Seed prompts for self-study (paper, section 4.1 and appendix C.1): the prompt that makes
participant A write the first user message about a chunk of the corpus.

Each type is a ``SeedPrompt`` subclass in its own file. A new type is added by writing a
subclass in its own file (a ``name`` and a ``sample(rng, chunk)`` method) and registering it in
``SEED_TYPES`` below; ``--seed-prompts`` then accepts its name.

``get_seed_prompts(spec)`` turns a ``--seed-prompts`` value into a ``SeedMix``:

* ``recall`` (default): this project's four direct types, one drawn uniformly per conversation;
* ``mixed``: the five types of the paper, one drawn uniformly per conversation;
* ``generic``: the single broad prompt of the paper's ablation;
* a comma-separated list of type names, e.g. ``question,summarization``;
* a file of the user's own prompts (``.txt``: one per line; ``.jsonl``: ``{"prompt": ...}``).
"""

from __future__ import annotations

import os
import random

from cart.io import CartError
from cart.seeds.base import SeedPrompt
from cart.seeds.cloze import ClozeSeed
from cart.seeds.creative import CreativeSeed
from cart.seeds.custom import CustomSeeds
from cart.seeds.facts import FactsSeed
from cart.seeds.generic import GenericSeed
from cart.seeds.qa import QASeed
from cart.seeds.question import QuestionSeed
from cart.seeds.recite import ReciteSeed
from cart.seeds.structuring import StructuringSeed
from cart.seeds.summarization import SummarizationSeed
from cart.seeds.use_case import UseCaseSeed

# The paper's five types, in its order; ``mixed`` draws uniformly among them.
SEED_TYPES: dict[str, type[SeedPrompt]] = {
    "structuring": StructuringSeed,
    "summarization": SummarizationSeed,
    "question": QuestionSeed,
    "use_case": UseCaseSeed,
    "creative": CreativeSeed,
}

# Direct types (this project's addition, still domain-free): the seed is the user message
# itself and A is skipped; ``recall`` draws uniformly among them.
RECALL_TYPES: dict[str, type[SeedPrompt]] = {
    "recite": ReciteSeed,
    "facts": FactsSeed,
    "qa": QASeed,
    "cloze": ClozeSeed,
}

MIXED = "mixed"
RECALL = "recall"
# The CPU-scale default (README, "The default recipe"): with SmolLM2-135M, p = 128, the direct
# types alone closed 95-98% of the answer-NLL gap on the four test corpora against 87-95% for
# mixed,recall, and synth ran ~25% faster (A is never run).
# `qa` stays although at 135M its replies hold a chunk's facts verbatim 30x less often than
# `recite`'s (2% against 62%): without it (and with random windows) meridian lost, 89% of the
# gap and 2/40 against 97% and 6/40 (README).
DEFAULT_SPEC = RECALL
CUSTOM_SUFFIXES = (".txt", ".jsonl")
KNOWN = (f"{MIXED}, {RECALL}, {GenericSeed.name}, " + ", ".join([*SEED_TYPES, *RECALL_TYPES])
         + ", or a file")

__all__ = [
    "SEED_TYPES", "SeedMix", "SeedPrompt", "get_seed_prompts", "DEFAULT_SPEC",
    "StructuringSeed", "SummarizationSeed", "QuestionSeed", "UseCaseSeed", "CreativeSeed",
    "GenericSeed", "CustomSeeds", "RECALL_TYPES", "ReciteSeed", "FactsSeed", "QASeed", "ClozeSeed",
]


class SeedMix:
    """The seed prompts of one run: a type is drawn uniformly, then a prompt of that type."""

    def __init__(self, seeds: list[SeedPrompt], label: str | None = None) -> None:
        if not seeds:
            raise ValueError("SeedMix needs at least one seed-prompt type")
        self.seeds = list(seeds)
        self.label = label

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.seeds]

    @property
    def direct_names(self) -> set[str]:
        """Types whose prompt is the user message itself (A is skipped)."""
        return {s.name for s in self.seeds if getattr(s, "direct", False)}

    def sample(self, rng: random.Random, chunk: str = "") -> tuple[str, str]:
        """Return ``(type_name, prompt_text)`` for a conversation about ``chunk``; the same
        ``rng`` state and chunk give the same pair."""
        seed = rng.choice(self.seeds)
        return seed.name, seed.sample(rng, chunk)

    def describe(self) -> str:
        """One line for logs and metadata, e.g. ``mixed: structuring, summarization, ...``."""
        if len(self.seeds) == 1 and isinstance(self.seeds[0], CustomSeeds):
            custom = self.seeds[0]
            n = len(custom.prompts)
            return f"custom: {custom.source} ({n} prompt{'s' if n != 1 else ''})"
        if len(self.seeds) == 1:
            return self.seeds[0].name
        return f"{self.label or MIXED}: " + ", ".join(self.names)

    def __repr__(self) -> str:
        return f"SeedMix({self.describe()!r})"


def _is_file_spec(spec: str) -> bool:
    return ("/" in spec or os.sep in spec or spec.lower().endswith(CUSTOM_SUFFIXES))


def get_seed_prompts(spec: str = DEFAULT_SPEC) -> SeedMix:
    """The ``SeedMix`` for a ``--seed-prompts`` value (see the module docstring)."""
    spec = spec.strip()
    if _is_file_spec(spec):
        return SeedMix([CustomSeeds.from_file(spec)])
    if spec == MIXED:
        return SeedMix([cls() for cls in SEED_TYPES.values()], label=MIXED)
    if spec == RECALL:
        return SeedMix([cls() for cls in RECALL_TYPES.values()], label=RECALL)
    if spec == GenericSeed.name:
        return SeedMix([GenericSeed()])
    if spec in SEED_TYPES or spec in RECALL_TYPES:
        return SeedMix([{**SEED_TYPES, **RECALL_TYPES}[spec]()])
    if "," not in spec and os.path.isfile(spec):
        return SeedMix([CustomSeeds.from_file(spec)])
    names: list[str] = []
    for part in spec.split(","):
        name = part.strip()
        if name == MIXED:
            expanded = list(SEED_TYPES)
        elif name == RECALL:
            expanded = list(RECALL_TYPES)
        elif name == GenericSeed.name or name in SEED_TYPES or name in RECALL_TYPES:
            expanded = [name]
        else:
            raise CartError(f"--seed-prompts: unknown seed-prompt type {name!r} (known: {KNOWN})")
        names += [n for n in expanded if n not in names]
    builtins = {GenericSeed.name: GenericSeed, **SEED_TYPES, **RECALL_TYPES}
    return SeedMix([builtins[n]() for n in names], label=MIXED)
