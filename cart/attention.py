"""Grouped-query attention without copying K/V.

transformers' SDPA path expands K/V to every query head (``repeat_kv``) whenever a mask is
present (left padding, cartridge batches, packing), copying the whole cache at every decode
step; on CPU that dominates long-context decoding. Here query heads are grouped under their KV
head instead (``[B, kv_heads, group * q, d]``), so SDPA reads each K/V once. Registered as the
attention implementation ``cart_gqa`` (with transformers' SDPA mask builder).

Shared KV prefixes (cascade attention): a forward pass may carry ``cart_prefixes``
(``SharedPrefixes``), KV that groups of batch rows attend to before their own cache -- a
cartridge and the requests that use it. The prefix is stored once per group and read by every
row of it (broadcast, never copied into the rows' caches), so a batch of requests on one
cartridge holds its K/V once; a row's softmax runs over [prefix scores, own scores] together,
which is exactly attention over the concatenation. A prefix may carry per-key attention biases
(``[kv_heads, p]`` per layer, added to the prefix's logits: compacted cartridges).

Compaction (``cart.compaction``) passes ``cart_compaction`` instead: an object whose
``fit(layer, query, scaling)`` builds that layer's prefix from the queries now reaching it and
returns the ``SharedPrefixes`` to attend to -- so each layer is fitted to queries that already
went through the compacted earlier layers.
"""

from __future__ import annotations

NAME = "cart_gqa"
_registered = False


class SharedPrefixes:
    """Per forward pass: ``groups`` of (batch rows, per-layer ``[kv_heads, p, head_dim]`` keys
    and values, per-layer ``[kv_heads, p]`` logit biases or None) -- KV those rows attend to
    before their own cache; rows in no group have no prefix. Pass as
    ``model(..., cart_prefixes=...)``."""

    def __init__(self, groups, batch_size: int):
        import torch

        self.groups = [(torch.as_tensor(rows, dtype=torch.long), kv, bias) for rows, kv, bias in groups]
        covered = sorted(r for rows, _, _ in groups for r in rows)
        if len(set(covered)) != len(covered) or (covered and not 0 <= covered[0] <= covered[-1] < batch_size):
            raise ValueError("prefix groups must be disjoint sets of batch rows")
        plain = sorted(set(range(batch_size)) - set(covered))
        self.plain = torch.as_tensor(plain, dtype=torch.long) if plain else None
        # one group over the whole batch in order: no gathering at all
        self.whole = len(groups) == 1 and covered == list(range(batch_size))


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  is_causal=None, cart_prefixes=None, cart_compaction=None, **kwargs):
    import torch.nn.functional as F

    if cart_compaction is not None:
        cart_prefixes = cart_compaction.fit(module.layer_idx, query, scaling)
    if cart_prefixes is not None and cart_prefixes.groups:
        return _prefixed_attention(module.layer_idx, query, key, value, attention_mask, scaling,
                                   cart_prefixes)
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if attention_mask is None:
        causal = q_len > 1 if is_causal is None else (is_causal and q_len > 1)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling,
                                             enable_gqa=group > 1)
        return out.transpose(1, 2).contiguous(), None
    # head h uses KV head h // group (as repeat_kv does): fold the group into the query axis
    grouped = query.reshape(b, kv_heads, group * q_len, d)
    mask = attention_mask[:, :, -q_len:, -key.shape[2]:]
    mask = mask.unsqueeze(2).expand(b, mask.shape[1], group, q_len, key.shape[2]).reshape(
        b, mask.shape[1], group * q_len, key.shape[2])
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, q_len, d).transpose(1, 2).contiguous(), None


def _prefixed_attention(layer: int, query, key, value, attention_mask, scaling, prefixes):
    """Attention where groups of rows also attend to a shared prefix (see the module doc)."""
    import torch

    b, heads, q_len, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    grouped = query.reshape(b, kv_heads, group * q_len, d)
    if attention_mask is None:  # one unpadded row: causal over its own cache
        i = torch.arange(q_len, device=query.device).unsqueeze(1)
        j = torch.arange(length, device=query.device).unsqueeze(0)
        allowed = (j <= i + (length - q_len)).view(1, 1, q_len, length).expand(b, 1, q_len, length)
    else:
        allowed = attention_mask[:, :, -q_len:, -length:]
        if allowed.dtype != torch.bool:
            allowed = allowed == 0  # an additive float mask: 0 where attending
    allowed = allowed.unsqueeze(2).expand(b, allowed.shape[1], group, q_len, length).reshape(
        b, allowed.shape[1], group * q_len, length)
    out = query.new_empty(b, kv_heads, group * q_len, d)

    def attend_rows(q, k, v, ok, pk, pv, bias):
        own = torch.matmul(q, k.transpose(-1, -2)) * scale
        own = own.masked_fill(~ok, float("-inf"))
        shared = torch.matmul(q, pk.transpose(-1, -2)) * scale  # [n, kv, gq, p]: pk broadcast
        if bias is not None:
            shared = shared + bias.to(shared.dtype).unsqueeze(1)  # [kv, 1, p]
        probs = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        p = pk.shape[-2]
        return torch.matmul(probs[..., :p], pv) + torch.matmul(probs[..., p:], v)

    def attend(q, k, v, ok, pk, pv, bias):
        # long prompts (prefill, compaction): query blocks, so the scores of one block at a
        # time are held (~32 MB), not the whole [gq, p + length] matrix
        rows = q.shape[2]
        block = max(256, (1 << 23) // max(1, q.shape[0] * q.shape[1] * (length + pk.shape[-2])))
        if rows <= block:
            return attend_rows(q, k, v, ok, pk, pv, bias)
        return torch.cat([attend_rows(q[:, :, i:i + block], k, v, ok[:, :, i:i + block], pk, pv, bias)
                          for i in range(0, rows, block)], dim=2)

    for rows, kv, biases in prefixes.groups:
        pk, pv = kv[layer]
        bias = None if biases is None else biases[layer]
        if prefixes.whole:
            out = attend(grouped, key, value, allowed, pk, pv, bias)
        else:
            out[rows] = attend(grouped[rows], key[rows], value[rows], allowed[rows], pk, pv, bias)
    if prefixes.plain is not None:
        rows = prefixes.plain
        out[rows] = torch.nn.functional.scaled_dot_product_attention(
            grouped[rows], key[rows], value[rows], attn_mask=allowed[rows], scale=scaling)
    return out.reshape(b, heads, q_len, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``cart_gqa`` available to ``model.set_attn_implementation``; returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, gqa_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME
