"""``cart compose``: concatenate cartridges along the sequence axis (paper section 5.4).

By default the result keeps ONE attention sink -- the first part's frozen token(s) -- followed
by every part's trainable tokens in the order given; later parts' sinks are dropped.
``sinks="all"`` keeps every part whole, its sink included (each part then sits next to exactly
the sink it was trained with; the extra sinks are stored with the trainable tokens).

No retraining, and no re-rotation: each part's keys keep the rotary positions 0..p_i-1 they were
trained at, and each part was trained with the tokens after it at positions p_i, p_i+1, ...
So the composed cartridge records ``query_position`` = the largest part's p (its own query
position, for a part that is itself composed): the tokens after it start there, and every
part of that size sees its keys at exactly the distances it was trained with (a smaller part
sees them a little further away). Since positions are baked into the keys and the prefix's
tokens never attend to each other at query time, the order of the parts only decides which
sink is kept -- ``cart eval`` measures A+B against B+A. Parts must come from the same model and
tokenizer, with the same dtype and KV shape.

Flat (ragged) cartridges (``cart.cartridge``) compose with flat ones only -- the windows of a long
corpus compacted one by one: each layer is the per-layer concatenation of the parts' columns,
biases included, so each head keeps its own keys of every part, and the sink modes apply per
head (``one``: the first part's H sinks; ``all``: every part's).
"""

from __future__ import annotations

from typing import Sequence

from cart.cartridge import Cartridge
from cart.io import CartError, Console, check_stdin_once, display_name

# metadata a composed cartridge takes from its first part (identical in every part)
_SHARED_KEYS = ("base_model", "model_config_hash", "tokenizer_hash")


SINKS = ("one", "all")


def compose(paths: Sequence[str], sinks: str = "one") -> Cartridge:
    """Compose cartridge files (one of them may be ``-``, stdin; any may be a PEFT adapter
    folder)."""
    check_stdin_once(paths)
    parts: list[tuple[str, Cartridge, str]] = []
    for path in paths:
        cart = Cartridge.load(path, name=display_name(path))
        parts.append((display_name(path), cart, cart.file_sha256))
    return compose_parts(parts, sinks)


def compose_parts(parts: Sequence[tuple[str, Cartridge, str]], sinks: str = "one") -> Cartridge:
    """Compose loaded cartridges, given as (name or path, cartridge, sha256) in order (``cart
    compose`` reads them from files; ``cart serve`` has them in its store)."""
    import torch

    if sinks not in SINKS:
        raise CartError(f"--sinks must be one of {', '.join(SINKS)}, got {sinks!r}")
    if len(parts) < 2:
        raise CartError("compose needs at least two cartridges")
    first_path, first, _ = parts[0]
    for path, cart, _ in parts[1:]:
        for key, what in (("model_config_hash", "model"), ("tokenizer_hash", "tokenizer")):
            if cart.metadata.get(key) != first.metadata.get(key):
                raise CartError(
                    f"{path}: trained for another {what} than {first_path} "
                    f"({cart.metadata.get('base_model')} {cart.metadata.get(key)} vs "
                    f"{first.metadata.get('base_model')} {first.metadata.get(key)})")
        if cart.flat != first.flat:
            raise CartError(f"{path}: a {'flat (ragged)' if cart.flat else 'rectangular'} cartridge "
                            f"cannot be composed with {'flat' if first.flat else 'rectangular'} "
                            f"{first_path}: compose flat cartridges only with flat ones")
        if cart.dtype != first.dtype:
            raise CartError(f"{path}: dtype {cart.dtype} differs from {first_path}'s {first.dtype}")
        shape, first_shape = ((c.num_layers, c.kv_heads, c.head_dim) for c in (cart, first))
        if shape != first_shape:
            raise CartError(f"{path}: KV shape (layers, kv heads, head dim) {shape} differs from "
                            f"{first_path}'s {first_shape}")
    def after_sink(j: int, c: Cartridge, i: int):
        """What part ``j`` puts after the composed cartridge's sink, in layer ``i``: its
        trainable tokens, preceded by its own sink when every part is kept whole."""
        return c.layer(i) if j > 0 and sinks == "all" else (c.keys[i], c.values[i])

    def bias(j: int, c: Cartridge, i: int):
        """Part ``j``'s attention biases in layer ``i``, sink first (zeros if it has none)."""
        return c.biases[i] if c.biases is not None else torch.zeros(c.kv_heads, c.num_tokens)

    keys, values, biases = [], [], []
    for i in range(first.num_layers):
        ks, vs = zip(*(after_sink(j, c, i) for j, (_, c, _) in enumerate(parts)))
        keys.append(torch.cat(ks, dim=1))
        values.append(torch.cat(vs, dim=1))
        biases.append(torch.cat([bias(j, c, i) if j == 0 or sinks == "all" else bias(j, c, i)[:, c.frozen_columns:]
                                 for j, (_, c, _) in enumerate(parts)], dim=1))
    if all(c.biases is None for _, c, _ in parts):
        biases = None
    md = {k: first.metadata[k] for k in _SHARED_KEYS if k in first.metadata}
    corpus_tokens = [c.metadata.get("corpus_tokens") for _, c, _ in parts]
    if all(isinstance(t, int) for t in corpus_tokens):
        md["corpus_tokens"] = sum(corpus_tokens)
    paths_all = [q for _, c, _ in parts for q in (c.metadata.get("corpus_paths") or [])]
    if paths_all:
        md["corpus_paths"] = paths_all
    md["init"] = {"kind": "compose", "sinks": sinks, "sink_from": first_path}
    md["query_position"] = max(c.query_position for _, c, _ in parts)
    md["parts"] = [{
        "file": path, "sha256": digest, "p": c.num_tokens, "num_frozen_tokens": c.num_frozen,
        "query_position": c.query_position,
        "tokens_kept": c.num_tokens - (0 if i == 0 or sinks == "all" else c.num_frozen),
        **{k: c.metadata[k] for k in ("corpus_hash", "corpus_tokens", "corpus_paths", "created",
                                      "steps", "tokens", "loss") if k in c.metadata},
        "init": (c.metadata.get("init") or {}).get("kind"),
    } for i, (path, c, digest) in enumerate(parts)]
    return Cartridge(frozen_keys=[t.clone() for t in first.frozen_keys],
                     frozen_values=[t.clone() for t in first.frozen_values],
                     keys=keys, values=values, metadata=md, biases=biases)


def compose_files(paths: Sequence[str], output: str | None, console: Console,
                  sinks: str = "one") -> Cartridge:
    cart = compose(paths, sinks)
    cart.save(output)
    if output not in (None, "-"):
        console.info(f"{output}: {cart.num_tokens} tokens from {len(paths)} cartridges "
                     f"({' + '.join(str(part['tokens_kept']) for part in cart.metadata['parts'])})")
    return cart
