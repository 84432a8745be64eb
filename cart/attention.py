"""Grouped-query attention without copying K/V.

transformers' SDPA path expands K/V to every query head (``repeat_kv``) whenever a mask is
present (left padding, cartridge batches, packing), copying the whole cache at every decode
step; on CPU that dominates long-context decoding. Here query heads are grouped under their KV
head instead (``[B, kv_heads, group * q, d]``), so SDPA reads each K/V once. Registered as the
attention implementation ``cart_gqa`` (with transformers' SDPA mask builder).
"""

from __future__ import annotations

NAME = "cart_gqa"
_registered = False


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  is_causal=None, **kwargs):
    import torch.nn.functional as F

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
