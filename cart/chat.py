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
