"""Cloze seed (direct): the user quotes the start of one sentence of the chunk and asks for
the rest of it, word for word.

Sent verbatim as the user message (see ``recite.py`` for why direct seeds exist). Questions
about a corpus name something the text states and ask for what the text says next to it (a
date, a number, a name); a cloze is that move in its plainest form, with a cue the teacher
finds in its context for certain, whatever the domain. Unlike the other direct seeds it
quotes its chunk, so each conversation asks about a different sentence.
"""

from __future__ import annotations

import random
import re

from cart.seeds.base import DirectSeed

VARIANTS = (
    'Complete this sentence from the document above, word for word: "{cue} ..."',
    'In the document above, what comes right after "{cue}"? Quote the rest of the sentence.',
    'Continue the document above from "{cue}", copying its words exactly.',
)
# A sentence worth a cloze has at least this many words: the cue keeps some and leaves some.
MIN_WORDS = 6
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def sentences(text: str) -> list[list[str]]:
    """The chunk's sentences (and lines) of at least ``MIN_WORDS`` words, each as its words."""
    words = (part.split() for part in _SENTENCE_END.split(text))
    return [w for w in words if len(w) >= MIN_WORDS]


class ClozeSeed(DirectSeed):
    name = "cloze"
    variants = VARIANTS

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        template = rng.choice(self.variants)
        candidates = sentences(chunk)
        if not candidates:  # no sentence long enough (a table, code): the chunk's first words
            candidates = [chunk.split()[:MIN_WORDS] or ["The", "document", "begins"]]
        words = rng.choice(candidates)
        # the cue stops between a third and two thirds of the way: the rest holds the facts
        cut = rng.randint(max(3, len(words) // 3), max(3, 2 * len(words) // 3))
        return template.format(cue=" ".join(words[:cut]))
