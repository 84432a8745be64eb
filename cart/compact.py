"""``cart compact``: a cartridge straight from the corpus, in seconds, by attention-matching
compaction (``cart.compaction``) -- no self-study, no gradient steps. Also the starting point
of ``cart distill --init attention-match``.

The corpus is shown to the model as ICL shows it (``cart.chat.document_turn_ids``) and its KV
cache compacted to p positions per layer. A corpus longer than one window (the corpus and its
repeat-prefill query must fit the model's context together) is compacted window by window,
each window at its own positions 0..T_w-1 with a share of p in proportion to its length, and
the windows are joined as ``cart compose`` joins cartridges (one sink; queries at the largest
window's length).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from cart.config import check_type
from cart.io import CartError, Console

# Room left in the context beyond twice the window (the corpus, then its repeat): the chat
# template's turns around them.
TEMPLATE_ROOM = 64


@dataclass
class CompactConfig:
    tokens: int = 512  # p, KV positions per layer (the sink included)
    window: int | None = None  # corpus tokens per window; None: the most the context allows
    max_queries: int = 8192  # reference query vectors per KV head in each layer's fit
    # global: each (layer, head) keeps what attention needs, same total memory (a flat
    # cartridge, transformers engine only); uniform: p per layer and head (vLLM serves it)
    budget: str = "global"
    # per-key attention biases; None: with a global budget (where they close much of the gap)
    # but not a uniform one (where they did not help, and vLLM would refuse the cartridge)
    biases: bool | None = None
    device: str = "auto"

    def __post_init__(self):
        from cart.compaction import BUDGETS

        check_type("tokens", self.tokens, int)
        check_type("max_queries", self.max_queries, int)
        if self.budget not in BUDGETS:
            raise CartError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.biases is None:
            self.biases = self.budget == "global"
        check_type("biases", self.biases, bool)
        if self.tokens < 2:
            raise CartError(f"-p/--tokens must be at least 2, got {self.tokens}")
        if self.window is not None:
            check_type("window", self.window, int)
            if self.window < 2:
                raise CartError(f"--window must be at least 2, got {self.window}")
        if self.max_queries < 1:
            raise CartError(f"--max-queries must be at least 1, got {self.max_queries}")


def window_bounds(total: int, window: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive windows of (nearly) equal length covering ``total`` tokens."""
    count = max(1, math.ceil(total / window))
    edges = [round(i * total / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def shares(lengths: Sequence[int], budget: int) -> list[int]:
    """``budget`` split in proportion to ``lengths`` (largest remainders), at least 1 each."""
    if budget < len(lengths):
        raise CartError(f"-p/--tokens leaves {budget} positions for {len(lengths)} windows: "
                        "raise -p or --window")
    total = sum(lengths)
    raw = [budget * n / total for n in lengths]
    out = [max(1, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(out) < budget:
        out[order[i % len(out)]] += 1
        i += 1
    while sum(out) > budget:
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def compact_ids(model: Any, tokenizer: Any, corpus_ids: Sequence[int], cfg: CompactConfig,
                console: Console, queries: Sequence[Sequence[int]] = ()):
    """The compacted cartridge of a tokenized corpus (metadata: ``init``, ``query_position``,
    ``corpus_tokens``; identity and corpus fields are the caller's). ``queries``: extra
    reference query sequences (self-study conversations), used when the corpus is one window."""
    from cart.chat import document_turn_ids
    from cart.compaction import CompactionConfig, compact, repeat_query_ids
    from cart.compose import compose_parts
    from cart.models import context_length

    started = time.perf_counter()
    limit = (context_length(model.config) - TEMPLATE_ROOM) // 2
    window = min(cfg.window or limit, limit)
    bounds = window_bounds(len(corpus_ids), window)
    budgets = shares([end - start for start, end in bounds], cfg.tokens - 1)
    parts = []
    for w, ((start, end), trainable) in enumerate(zip(bounds, budgets)):
        ids = list(corpus_ids[start:end])
        prefix = document_turn_ids(tokenizer, tokenizer.decode(ids))
        refs = [repeat_query_ids(tokenizer, ids)] + (list(queries) if len(bounds) == 1 else [])
        part = compact(model, prefix, refs, CompactionConfig(trainable + 1, cfg.max_queries,
                                                             bias=cfg.biases, budget=cfg.budget))
        console.info(f"window {w + 1}/{len(bounds)}: corpus tokens {start}..{end}, {len(prefix)} "
                     f"KV positions -> {trainable + 1}")
        parts.append((f"window {w + 1}", part, ""))
    cart = parts[0][1] if len(parts) == 1 else compose_parts(parts, "one")
    seconds = time.perf_counter() - started
    cart.metadata.update(
        corpus_tokens=len(corpus_ids),
        init={"kind": "attention-match", "windows": len(bounds), "window_tokens": window,
              "max_queries": cfg.max_queries, "biases": cfg.biases, "budget": cfg.budget,
              "extra_queries": len(queries) if len(bounds) == 1 else 0,
              "seconds": round(seconds, 1)})
    cart.metadata.pop("parts", None)  # the windows are not files
    return cart


def compact_corpus(inputs: Sequence[str], cfg: CompactConfig, model_spec: str | None,
                   output: str | None, console: Console):
    """The whole ``cart compact`` job: read the corpus, compact it, write the cartridge."""
    import torch

    from cart.chunk import corpus_hash, corpus_text, read_corpus
    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_device, resolve_model

    docs = read_corpus(inputs, console)
    ref = resolve_model(model_spec, console)
    tokenizer = load_tokenizer(ref)
    corpus_ids = tokenizer(corpus_text(docs), add_special_tokens=False)["input_ids"]
    if cfg.tokens > len(corpus_ids):
        raise CartError(f"-p/--tokens {cfg.tokens} is more than the corpus's {len(corpus_ids)} "
                        "tokens (lower -p)")
    model = load_model(ref, dtype="float32", device=resolve_device(cfg.device))
    identity = ModelIdentity.of(ref, model.config, tokenizer)
    with torch.no_grad():
        cart = compact_ids(model, tokenizer, corpus_ids, cfg, console)
    cart.metadata.update(
        base_model=identity.model_id, model_config_hash=identity.config_hash,
        tokenizer_hash=identity.tokenizer_hash,
        corpus_hash=corpus_hash(docs),
        corpus_paths=[d.path for d in docs])
    cart.save(output)
    console.info(f"{len(corpus_ids)} corpus tokens -> p={cart.num_tokens} in "
                 f"{cart.metadata['init']['seconds']} s"
                 + (f" -> {output}" if output not in (None, "-") else ""))
    return cart
