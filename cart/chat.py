"""Chat templates with exact token ids.

Teacher and student must see the same assistant token ids, so generated messages are never
re-tokenized from text: the template is rendered with placeholders where token-id contents go,
the text between placeholders is tokenized, and the ids are spliced in. The template's own
defaults (a BOS, or a default system prompt such as SmolLM2's) stay as the model defines them.
"""

from __future__ import annotations

import re
from typing import Any

_PLACEHOLDER = "\ue000cart{}\ue001"  # private-use characters: never in real text
_SPLIT = re.compile("\ue000cart(\\d+)\ue001")


def render_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool
               ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``messages`` under the chat template, and the [start, end) span of every
    message whose ``content`` is a list of token ids (spliced in verbatim), in order."""
    spliced: list[list[int]] = []
    rendered = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            rendered.append({**m, "content": _PLACEHOLDER.format(len(spliced))})
            spliced.append(content)
        else:
            rendered.append(m)
    text = tokenizer.apply_chat_template(rendered, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    parts = _SPLIT.split(text)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                ids.extend(tokenizer(part, add_special_tokens=False).input_ids)
        else:
            content = spliced[int(part)]
            spans.append((len(ids), len(ids) + len(content)))
            ids.extend(content)
    return ids, spans


# The prompt contract shared by synth (the teacher sees a chunk so), eval (ICL sees the corpus
# so) and compaction (the corpus KV a cartridge replaces).
SYSTEM_TEMPLATE = ("You are in a conversation about the following document.\n\n"
                   "<document>\n{chunk}\n</document>")


def system_prompt(chunk: dict[str, Any]) -> str:
    """The system message the teacher sees a chunk in: ``SYSTEM_TEMPLATE``, after the chunk's
    description when it has one."""
    text = SYSTEM_TEMPLATE.format(chunk=chunk["text"])
    desc = chunk.get("description")
    return f"{desc}\n\n{text}" if desc else text


def shared_prefix_len(tokenizer, system: str) -> int:
    """How many leading tokens every prompt with this system message shares (the template's
    rendering of the system turn): the longest common prefix of two different continuations."""
    a = render_ids(tokenizer, [{"role": "system", "content": system},
                               {"role": "user", "content": "a"}], True)[0]
    b = render_ids(tokenizer, [{"role": "system", "content": system},
                               {"role": "user", "content": "b"}], True)[0]
    return _common_prefix(a, b)


def document_turn_ids(tokenizer, text: str) -> list[int]:
    """The token ids of the system turn holding ``text`` as ICL shows it (``SYSTEM_TEMPLATE``),
    up to where the next turn would start: what a cartridge of that document stands for."""
    system = SYSTEM_TEMPLATE.format(chunk=text)
    alone = render_ids(tokenizer, [{"role": "system", "content": system}], False)[0]
    then = render_ids(tokenizer, [{"role": "system", "content": system},
                                  {"role": "user", "content": "a"}], True)[0]
    return alone[:_common_prefix(alone, then)]


def render_cartridge_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool
                         ) -> tuple[list[int], list[tuple[int, int]]]:
    """``render_ids`` for the tokens that follow a cartridge: the conversation as it follows the
    document's system turn in ICL, which the cartridge stands for -- so a template's default
    system prompt (SmolLM2's) is not inserted, exactly as it is not with the document in
    context. The teacher (synth), the student (distill), compaction, eval and serve all use it."""
    doc = [{"role": "system", "content": SYSTEM_TEMPLATE.format(chunk="")}]
    turn = document_turn_ids(tokenizer, "")
    ids, spans = render_ids(tokenizer, doc + list(messages), add_generation_prompt)
    if ids[:len(turn)] != turn:
        from cart.io import CartError

        raise CartError("the model's chat template renders a system turn differently when "
                        "messages follow it: cart cannot place a cartridge before them")
    n = len(turn)
    return ids[n:], [(a - n, b - n) for a, b in spans]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
