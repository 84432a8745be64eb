"""Facts seed (direct): the user asks for every specific detail of the document, listed.

Sent verbatim as the user message (see ``recite.py`` for why direct seeds exist). Names,
numbers, dates and places are what questions about a corpus ask for, whatever its domain.
"""

from __future__ import annotations

from cart.seeds.base import DirectSeed

VARIANTS = (
    "List every fact stated in the document above, one per line: each name, number, date "
    "and place together with what it refers to.",
    "Make a complete list of the specific details in the document above (names, numbers, "
    "dates, places, identifiers), each with what it belongs to.",
    "Write down, as a bulleted list, all the concrete facts the document above states.",
)


class FactsSeed(DirectSeed):
    name = "facts"
    variants = VARIANTS
