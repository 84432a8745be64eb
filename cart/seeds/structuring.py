"""Structuring seed: A asks for part of the document to be rewritten in a data format (JSON,
YAML, TOML, INI, XML or plain text, drawn at random), keeping its precise details.

A new type is added by writing a subclass in its own file and registering it in SEED_TYPES.
"""

from __future__ import annotations

import random

from cart.seeds.base import ONLY_THE_MESSAGE, SeedPrompt

DATA_FORMATS = ("JSON", "YAML", "TOML", "INI", "XML", "plain text")


class StructuringSeed(SeedPrompt):
    name = "structuring"

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        data_format = rng.choice(DATA_FORMATS)
        template = (
            f"Could you take what <part of the document> of <document title> says about "
            f"<a specific subject> and organize it as {data_format}? Keep every exact detail, "
            f"such as dates, times, names and numbers."
        )
        return (
            f"Write one chat message that asks an LLM to reorganize the information from a "
            f"particular part of the document above into {data_format}. "
            f"The message must make plain which document and which part of it it refers to, "
            f"and should ask for precise details such as dates, times, names and numerical "
            f"values to be kept. "
            f"You may model it on this template, replacing the bracketed parts with details "
            f"taken from the document:\n\n\"{template}\"\n\n"
            f"{ONLY_THE_MESSAGE}"
        )
