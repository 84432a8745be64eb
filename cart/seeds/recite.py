"""Recite seed (direct): the user asks for the document back, verbatim.

A *direct* seed is sent to B as the user message itself; A does not write it. Why: a 135M
model writes poor questions about a chunk (mostly off-topic or invented, see FINDINGS), while
copying from its context is something even a small teacher does well, so the teacher's answer
carries the chunk's facts and the cartridge is distilled on them. Still generic: it names no
domain, only "the document".
"""

from __future__ import annotations

from cart.seeds.base import DirectSeed

VARIANTS = (
    "Repeat the document above word for word.",
    "Please reproduce the document above exactly as it is written.",
    "Recite the text of the document above, from its beginning, without changing anything.",
)


class ReciteSeed(DirectSeed):
    name = "recite"
    variants = VARIANTS
