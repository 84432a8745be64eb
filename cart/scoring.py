"""Answering and scoring questions with a KV prefix: nothing, the corpus in context (ICL), or a
cartridge. The core ``cart eval`` builds on; ``examples/compare.py`` uses it directly.

Prompts are the ones the cartridge was trained for: the student sequence of ``cart synth`` is
the conversation under the model's chat template *without* a system message (the template's
own default system prompt, if any, stays), so a cartridge is queried the same way. ICL puts the
corpus in the system message exactly as the teacher saw a chunk in ``cart synth``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from cart.chat import render_ids
from cart.kvcache import cache_from_kv


@dataclass
class Prefix:
    """Per-layer KV ``[kv_heads, n, head_dim]`` that every prompt continues from (may be empty)."""

    name: str
    kv: list[tuple[Any, Any]] | None
    tokens: int
    system: str | None = None  # ICL: the system message whose KV this is


def question_messages(q: dict[str, Any]) -> list[dict[str, Any]]:
    text = q["question"]
    if q.get("choices"):
        letters = string.ascii_uppercase
        options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(q["choices"]))
        text = f"{text}\n{options}\nAnswer with the letter of the correct option."
    return [{"role": "user", "content": text}]


def reference_answer(q: dict[str, Any]) -> str:
    if q.get("choices"):
        i = string.ascii_uppercase.index(q["answers"][0].strip().upper()[0])
        return f"{q['answers'][0]}. {q['choices'][i]}"
    return q["answers"][0]


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(text.split())


def score_prediction(q: dict[str, Any], prediction: str) -> float:
    if q.get("metric") == "multiple_choice":
        letters = string.ascii_uppercase[: len(q["choices"])]
        gold = q["answers"][0].strip().upper()[0]
        m = re.search(rf"\b([{letters}])\b[.):]?", prediction.strip())
        if m and m.group(1) == gold:
            return 1.0
        chosen = [i for i, c in enumerate(q["choices"]) if normalize(c) in normalize(prediction)]
        return 1.0 if len(chosen) == 1 and letters[chosen[0]] == gold else 0.0
    pred = normalize(prediction)
    return 1.0 if any(normalize(a) in pred for a in q["answers"]) else 0.0


def prompt_ids(tokenizer, prefix: Prefix, messages, answer: list[int] | None = None
               ) -> tuple[list[int], tuple[int, int] | None]:
    """Ids after the prefix (and the answer's span in them when an answer is given)."""
    msgs = list(messages)
    if prefix.system is not None:
        msgs = [{"role": "system", "content": prefix.system}, *msgs]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    ids, spans = render_ids(tokenizer, msgs, add_generation_prompt=answer is None)
    skip = prefix.tokens if prefix.system is not None else 0
    span = (spans[0][0] - skip, spans[0][1] - skip) if answer is not None else None
    return ids[skip:], span


def answer_logprob(model, tokenizer, prefix: Prefix, q: dict[str, Any]) -> tuple[float, int]:
    """Teacher-forced log-probability of the reference answer: (sum, number of tokens)."""
    import torch

    answer = tokenizer(reference_answer(q), add_special_tokens=False)["input_ids"]
    ids, (start, end) = prompt_ids(tokenizer, prefix, question_messages(q), answer)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache_from_kv(model, prefix.kv),
                       use_cache=True).logits[0].float()
    logp = torch.log_softmax(logits[start - 1:end - 1], dim=-1)
    gold = torch.tensor(ids[start:end])
    return float(logp.gather(1, gold.unsqueeze(1)).sum()), end - start


def generate(model, tokenizer, prefix: Prefix, q: dict[str, Any], max_new_tokens: int) -> str:
    import torch

    ids, _ = prompt_ids(tokenizer, prefix, question_messages(q))
    cache = cache_from_kv(model, prefix.kv)
    eos = tokenizer.eos_token_id
    out: list[int] = []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[0, -1]
        for _ in range(max_new_tokens):
            nxt = int(logits.argmax())
            if nxt == eos:
                break
            out.append(nxt)
            logits = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                           use_cache=True).logits[0, -1]
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def icl_prefix(model, tokenizer, system: str, name: str = "icl") -> Prefix:
    """The KV of the system turn holding the corpus (shared by every question)."""
    import torch

    from cart.kvcache import prefix_kv
    from cart.synth import shared_prefix_len

    n = shared_prefix_len(tokenizer, system)
    ids = render_ids(tokenizer, [{"role": "system", "content": system},
                                 {"role": "user", "content": "a"}], True)[0][:n]
    return Prefix(name, prefix_kv(model, torch.tensor(ids)), n, system)


def cartridge_prefix(cart, name: str) -> Prefix:
    kv = [tuple(t.float() for t in cart.layer(i)) for i in range(cart.num_layers)]
    return Prefix(name, kv, cart.num_tokens)


def evaluate(model, tokenizer, prefix: Prefix, questions: list[dict[str, Any]],
             max_new_tokens: int = 48) -> list[dict[str, Any]]:
    rows = []
    for q in questions:
        lp, n = answer_logprob(model, tokenizer, prefix, q)
        pred = generate(model, tokenizer, prefix, q, max_new_tokens)
        rows.append({"id": q["id"], "method": prefix.name, "prediction": pred,
                     "score": score_prediction(q, pred), "answer_logprob": lp,
                     "answer_tokens": n})
    return rows
