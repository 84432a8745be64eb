"""Cartridge <-> transformers KV cache.

A cartridge's keys are post-RoPE at positions ``0..p-1``; the tokens that follow it start at
position ``p``, which is what transformers does by default for a cache of length p.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cart.cartridge import Cartridge
from cart.io import CartError

if TYPE_CHECKING:
    import torch


def move_keys(config: Any, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Keys ``[..., n, head_dim]`` stored post-RoPE, moved ``shift`` positions later (earlier
    when negative). RoPE scores depend only on the query-key distance, so moving every key of
    a cartridge and its queries by the same amount leaves its attention unchanged (up to
    float rounding): how vLLM, which puts the first query right after the cartridge, and PEFT
    hold a cartridge whose queries start elsewhere (composed or compacted)."""
    import importlib

    import torch

    if shift == 0:
        return keys
    kind = config.model_type
    try:
        module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        rope_class = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    except (ImportError, StopIteration):
        raise CartError(f"cannot move a cartridge's keys to other positions: no rotary embedding "
                        f"found for model type {kind!r}") from None
    rope = rope_class(config=config)
    if float(getattr(rope, "attention_scaling", 1.0)) != 1.0:
        raise CartError(f"cannot move a cartridge's keys to other positions: {kind}'s RoPE "
                        "scales attention")
    x = keys.float()
    cos, sin = rope(x, torch.tensor([[shift]]))
    cos, sin = cos[0, 0], sin[0, 0]  # [head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(keys.dtype)


def at_query_position(cart: Cartridge, config: Any, position: int) -> Cartridge:
    """The same cartridge with its queries at ``position``: every key, the sink's included,
    moved ``position - query_position`` positions (``move_keys``); values and biases as they
    are."""
    shift = position - cart.query_position
    if shift == 0:
        return cart
    frozen, trainable = ([move_keys(config, k, shift) for k in group]
                         for group in (cart.frozen_keys, cart.keys))
    metadata = {**cart.metadata, "query_position": position}
    return Cartridge(frozen, cart.frozen_values, trainable, cart.values, metadata, cart.biases)


def prefix_kv(model: Any, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's own KV cache for one token sequence: per layer ``[kv_heads, T, head_dim]``."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=input_ids.view(1, -1), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    return [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]


def cartridge_from_tokens(model: Any, input_ids: torch.Tensor, num_frozen: int = 1,
                          metadata: dict[str, Any] | None = None) -> Cartridge:
    """A cartridge holding the KV cache of ``input_ids`` (the paper's initialization when they
    are the corpus's first p tokens), the first ``num_frozen`` positions as the frozen sink."""
    if not 0 < num_frozen < input_ids.numel():
        raise ValueError(f"need more than {num_frozen} tokens, got {input_ids.numel()}")
    kv = prefix_kv(model, input_ids)
    return Cartridge(
        frozen_keys=[k[:, :num_frozen].contiguous() for k, _ in kv],
        frozen_values=[v[:, :num_frozen].contiguous() for _, v in kv],
        keys=[k[:, num_frozen:].contiguous() for k, _ in kv],
        values=[v[:, num_frozen:].contiguous() for _, v in kv],
        metadata=dict(metadata or {}),
    )
