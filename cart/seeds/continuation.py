"""Continuation seed (direct): the user quotes a few words from the chunk and asks for what
follows them, word for word.

Sent verbatim as the user message (see ``recite.py`` for why direct seeds exist). Unlike the
other seeds it is drawn for one chunk: the quote starts at a random line or sentence of that
chunk, so over a run the teacher's answers walk the whole corpus, passage by passage, and the
cartridge is distilled on recalling each passage from a cue -- the skill a question about a
detail of the corpus needs. Still generic: the words are the corpus's own.
"""

from __future__ import annotations

import random
import re

from cart.seeds.base import DirectSeed

VARIANTS = (
    'Continue the document above from "{quote}", word for word.',
    'In the document above, what comes right after "{quote}"? Quote the text that follows.',
    'Find "{quote}" in the document above and copy out the passage that follows it.',
)
QUOTE_WORDS = 8
# where a quote may start: the beginning of a line or of a sentence
STARTS = re.compile(r"(?:^|\n|(?<=[.!?:;])\s)\s*(?=\S)")


class ContinuationSeed(DirectSeed):
    name = "continuation"
    variants = VARIANTS
    uses_chunk = True

    def sample(self, rng: random.Random, chunk: str = "") -> str:
        """A prompt quoting ``QUOTE_WORDS`` words of ``chunk`` from a random line or sentence
        start that leaves something to continue; without a chunk, its first words."""
        starts = [m.end() for m in STARTS.finditer(chunk)]
        usable = [s for s in starts if len(chunk[s:].split()) > 2 * QUOTE_WORDS] or [0]
        quote = " ".join(chunk[rng.choice(usable):].split()[:QUOTE_WORDS]).replace('"', "'")
        return rng.choice(self.variants).format(quote=quote)
