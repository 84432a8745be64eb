"""Custom seeds: the user's own seed prompts, read from a file (``--seed-prompts FILE``).

A ``.txt`` file holds one prompt per non-empty line (lines starting with ``#`` are comments);
a ``.jsonl`` file holds one JSON object per line with a string field ``prompt`` (other fields,
such as ``type``, are ignored). Any other file is read as ``.txt``.

A new type is added by writing a subclass in its own file and registering it in SEED_TYPES.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from cart.io import CartError
from cart.seeds.base import SeedPrompt


class CustomSeeds(SeedPrompt):
    """User-supplied prompts; ``sample`` picks one uniformly."""

    name = "custom"

    def __init__(self, prompts: list[str], source: str) -> None:
        if not prompts:
            raise CartError(f"{source}: no seed prompts found")
        self.prompts = list(prompts)
        self.source = source

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        return rng.choice(self.prompts)

    def __repr__(self) -> str:
        return f"CustomSeeds({self.source!r}, {len(self.prompts)} prompts)"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CustomSeeds:
        source = str(path)
        p = Path(path)
        if not p.exists():
            raise CartError(f"{source}: no such file")
        if p.is_dir():
            raise CartError(f"{source}: is a directory, expected a file of seed prompts")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CartError(f"{source}: not UTF-8 text") from None
        except OSError as e:
            raise CartError(f"{source}: cannot read ({e.strerror})") from None
        if p.suffix.lower() == ".jsonl":
            prompts = _parse_jsonl(text, source)
        else:
            prompts = _parse_txt(text)
        return cls(prompts, source)


def _parse_txt(text: str) -> list[str]:
    prompts = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    return prompts


def _parse_jsonl(text: str, source: str) -> list[str]:
    prompts = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            record = json.loads(raw)
        except ValueError:
            raise CartError(f"{where}: invalid JSON") from None
        if not isinstance(record, dict):
            raise CartError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "prompt" not in record:
            raise CartError(f"{where}: missing field 'prompt'")
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            got = type(prompt).__name__
            raise CartError(f"{where}: field 'prompt' must be a string, got {got}")
        if not prompt.strip():
            raise CartError(f"{where}: field 'prompt' is empty")
        prompts.append(prompt)
    return prompts

