"""Grouped-query attention without copying K/V.

transformers' SDPA path expands K/V to every query head (``repeat_kv``) whenever a mask is
present (left padding, cartridge batches, packing), copying the whole cache at every decode
step; on CPU that dominates long-context decoding. Here query heads are grouped under their KV
head instead (``[B, kv_heads, group * q, d]``), so SDPA reads each K/V once. Registered as the
attention implementation ``cart_gqa`` (with transformers' SDPA mask builder).

Shared KV prefixes (cascade attention): a forward pass may carry ``cart_prefixes``
(``SharedPrefixes``), KV that groups of batch rows attend to before their own cache -- a
cartridge and the requests that use it. A row's softmax runs over [prefix scores, own scores]
together, which is exactly attention over the concatenation. A prefix may carry per-key
attention biases (``[kv_heads, p]`` per layer, added to the prefix's logits: compacted
cartridges). A flat (ragged) cartridge (``cart.cartridge``: one K/V row ``[1, p, d]`` for every
KV head, ``[kv_heads, p]`` biases that are -inf off each head's own columns) is read as is: its
``[1, 1, p, d]`` K/V broadcast over the KV heads in the matmuls, and the biases leave each head
its own keys. Every row is served by one batched set of tensor ops per layer, however many
cartridges the batch mixes (no Python loop over cartridges or rows), and no cartridge is ever
copied per row -- the queries are grouped by cartridge instead:

* the prefixes are read where they are: one cartridge as its own ``[1, kv_heads, p, d]`` K/V;
  several stacked once per ``SharedPrefixes`` (lazily, per layer) into ``[S, kv_heads, p_max,
  d]`` K/V zero-padded to the longest, plus ``[S, kv_heads, p_max]`` biases (-inf on padding, 0
  for a cartridge without biases). The stack is the one extra copy of the batch's distinct
  cartridges, held as long as the ``SharedPrefixes`` (a running batch keeps it while its rows do
  not change, and a shrinking batch keeps it: see ``previous``).
* the rows' grouped queries ``[B, kv_heads, group * q, d]`` are arranged by cartridge into
  ``[S, kv_heads, R * group * q, d]`` (R: most rows on one cartridge; a cartridge with fewer
  rows pads with copies of one, ignored), so the prefix scores are one batched matmul against
  the ``[S, kv_heads, d, p_max]`` stack, reading each cartridge once. The scores go back to row
  order ``[B, kv_heads, group * q, p_max]`` for the one softmax with the rows' own scores, and
  the prefix probabilities go by cartridge again for one matmul against the stacked values.
  Only queries, scores and outputs move (small at decode, q = 1; no row gather at all for one
  cartridge over every row, or a cartridge per row stacked in row order). Uneven groups cost
  matmul work on the padded query slots (S * R rows instead of B), not memory traffic.
* rows on no cartridge are masked out of the prefix: scores set to -inf and prefix output to 0
  by ``masked_fill`` rather than added masks, so a NaN cartridge cannot reach them (NaN + -inf
  and 0 * NaN are NaN). Padding keys are zeros with a -inf bias: exactly no probability.

Compaction with a global budget passes ``cart_observer``, called with each layer's
``(layer, query, key, value, scaling, attention_mask)``: it computes the layer's attention
itself and returns it (``[B, heads, q, d]``), keeping what it needs on the way. Compaction with a
uniform one (``cart.compaction``) passes ``cart_compaction`` instead: an object whose
``fit(layer, query, scaling)`` builds that layer's prefix from the queries now reaching it and
returns the ``SharedPrefixes`` to attend to -- so each layer is fitted to queries that already
went through the compacted earlier layers.

Training (``cart distill``) packs conversations into rows behind one cartridge. On CUDA it
attends with FlexAttention instead (``packed_block_mask``, ``_flex_attention``): keys are
[cartridge, own], the mask comes from per-token document ids (a BlockMask built once per forward
and passed as the model's ``attention_mask``), the cartridge's biases are a ``score_mod``. Which
path a device takes: ``training_attention``. The dense path (CPUs, and flat cartridges anywhere)
runs ``_attend_trained``: a fused SDPA per KV head with the biases and the packing in its mask.
"""

from __future__ import annotations

NAME = "cart_gqa"
_registered = False
_compiled_flex = None  # torch.compile(flex_attention), built on first use on CUDA


class SharedPrefixes:
    """Per forward pass: ``groups`` of (batch rows, per-layer ``[kv_heads, p, head_dim]`` keys
    and values (``[1, p, head_dim]``: flat, shared by the heads), per-layer ``[kv_heads, p]``
    logit biases or None) -- KV those rows attend to
    before their own cache; rows in no group have no prefix. Pass as
    ``model(..., cart_prefixes=...)``. Reuse one object across forward passes while its rows
    do not change: what is built for a layer (the stack of several cartridges) is kept on it.
    ``previous``: the object this one replaces (the same batch with rows gone or added); its
    stack is reused when it holds every cartridge here and is not mostly cartridges gone."""

    def __init__(self, groups, batch_size: int, previous: SharedPrefixes | None = None):
        import torch

        self.groups = [(torch.as_tensor(rows, dtype=torch.long), kv, bias) for rows, kv, bias in groups]
        covered = sorted(r for rows, _, _ in groups for r in rows)
        if len(set(covered)) != len(covered) or (covered and not 0 <= covered[0] <= covered[-1] < batch_size):
            raise ValueError("prefix groups must be disjoint sets of batch rows")
        self.batch_size = batch_size
        self._stack = None
        if len(self.groups) > 1:  # stacked by first row: a cartridge per row needs no shuffle
            by_row = sorted(self.groups, key=lambda g: min(g[0].tolist(), default=batch_size))
            self._stack = _PrefixStack.reuse(previous, self.groups) or _PrefixStack(
                [(kv, bias) for _, kv, bias in by_row])
        self._slots = self._slot_rows()
        self._placement = None  # _Placement on the prefixes' device, built once

    def _slot_rows(self) -> list[list[int]]:
        """The batch rows on each prefix slot (the stack's order; one slot without a stack)."""
        if self._stack is None:
            return [self.groups[0][0].tolist()]
        slots: list[list[int]] = [[] for _ in self._stack.slots]
        for rows, kv, bias in self.groups:
            slots[self._stack.slot(kv, bias)] = rows.tolist()
        return slots

    def stacked_nbytes(self) -> int:
        """Bytes of the padded stack of several cartridges built so far (0 for one)."""
        return 0 if self._stack is None else self._stack.nbytes()

    def layer(self, layer: int):
        """This layer's prefixes as stored, read in place: (keys, values ``[S, kv_heads, p, d]``,
        biases ``[S, kv_heads, 1, p]`` or None, the ``_Placement`` of rows on slots). S is 1
        (one cartridge, its own tensors: ``[1, 1, p, d]`` K/V for a flat one, broadcast over the
        heads) or the stack's slots."""
        if self._stack is None:
            _, kv, biases = self.groups[0]
            k, v = kv[layer]
            bias = None if biases is None else biases[layer][None, :, None]
            k, v = k[None], v[None]
        else:
            k, v, bias = self._stack.layer(layer)
            bias = None if bias is None else bias.unsqueeze(2)
        if self._placement is None:
            self._placement = _Placement(self._slots, self.batch_size, k.device)
        return k, v, bias, self._placement


class _Placement:
    """Where each batch row's queries sit when grouped by prefix slot: slot s holds rows
    ``slots[s]`` at positions ``s * width ..`` of ``order`` (``[S * width]``, row per
    position; a slot with fewer rows repeats its first, whose copy is ignored), ``where``
    (``[B]``) is each row's position (both None when position i holds row i: one cartridge
    for all, or a cartridge per row in row order), ``has`` (``[B, 1, 1, 1]`` bool, None when every row
    has a prefix) is False on rows with none (they read position 0, masked out)."""

    def __init__(self, slots: list[list[int]], batch_size: int, device):
        import torch

        self.width = max(len(rows) for rows in slots)
        order, where = [], [0] * batch_size
        for s, rows in enumerate(slots):
            for i, r in enumerate(rows):
                where[r] = s * self.width + i
            order += rows + (rows[:1] or [0]) * (self.width - len(rows))  # a slot may be unused
        self.slots = len(slots)
        in_place = order == list(range(batch_size))  # position i holds row i: nothing to move
        self.order, self.where = (None if in_place else torch.tensor(ix, dtype=torch.long, device=device)
                                  for ix in (order, where))
        placed = sum(len(rows) for rows in slots)
        self.has = None
        if placed < batch_size:
            has = torch.zeros(batch_size, dtype=torch.bool)
            has[[r for rows in slots for r in rows]] = True
            self.has = has.view(-1, 1, 1, 1).to(device)

    def to_slots(self, x):
        """``[B, kv, n, m]`` (rows) -> ``[S, kv, width * n, m]`` (rows grouped by slot)."""
        _, kv, n, m = x.shape
        x = x if self.order is None else x.index_select(0, self.order)
        x = x.view(self.slots, self.width, kv, n, m)
        return x.transpose(1, 2).reshape(self.slots, kv, self.width * n, m)

    def to_rows(self, y, n: int):
        """``[S, kv, width * n, m]`` (grouped by slot) -> ``[B, kv, n, m]`` (row order)."""
        s, kv, _, m = y.shape
        y = y.view(s, kv, self.width, n, m).transpose(1, 2).reshape(s * self.width, kv, n, m)
        return y if self.where is None else y.index_select(0, self.where)


class _PrefixStack:
    """Several cartridges stacked per layer, read in place by one batched matmul (built
    lazily, once per layer): keys and values ``[S, kv_heads, p_max, d]`` zero-padded to the
    longest, biases ``[S, kv_heads, p_max]`` with -inf on padding and 0 for a cartridge
    without biases (None when no cartridge is padded or biased). ``slots``: the (per-layer
    K/V, biases) stacked."""

    def __init__(self, slots):
        self.slots = slots
        self.layers: dict[int, tuple] = {}

    @classmethod
    def reuse(cls, previous: SharedPrefixes | None, groups) -> _PrefixStack | None:
        stack = None if previous is None else previous._stack
        if stack is None or len(stack.slots) > 2 * len(groups):  # mostly cartridges gone: restack
            return None
        if any(stack.slot(kv, bias) is None for _, kv, bias in groups):
            return None
        return stack

    def slot(self, kv, bias) -> int | None:
        # by identity: the same converted tensors of the same cartridge (the engine keeps one
        # copy per KVPrefix object)
        return next((i for i, (k, b) in enumerate(self.slots) if k is kv and b is bias), None)

    def layer(self, layer: int):
        got = self.layers.get(layer)
        if got is None:
            got = self.layers[layer] = _pad_and_stack(
                [(kv[layer], None if bias is None else bias[layer]) for kv, bias in self.slots])
        return got

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for got in self.layers.values() for t in got
                   if t is not None)


def _pad_and_stack(parts):
    """[((k, v) ``[kv_heads, p_s, d]``, bias ``[kv_heads, p_s]`` or None)] -> keys, values
    ``[S, kv_heads, p_max, d]`` and biases ``[S, kv_heads, p_max]`` or None (see _PrefixStack).
    A flat cartridge's ``[1, p_s, d]`` K/V are broadcast into every head's slot (its biases keep
    each head to its own keys). Runs once per layer per stack, not per step."""
    (k0, _), _ = parts[0]
    p_max = max(k.shape[-2] for (k, _), _ in parts)
    heads = max([k.shape[0] for (k, _), _ in parts] + [b.shape[0] for _, b in parts if b is not None])
    keys = k0.new_zeros(len(parts), heads, p_max, k0.shape[-1])
    values = keys.clone()
    biased = any(b is not None for _, b in parts) or any(k.shape[-2] != p_max for (k, _), _ in parts)
    bias = k0.new_full((len(parts), heads, p_max), float("-inf")) if biased else None
    for s, ((k, v), b) in enumerate(parts):
        p = k.shape[-2]
        keys[s, :, :p] = k
        values[s, :, :p] = v
        if bias is not None:
            bias[s, :, :p] = 0 if b is None else b
    return keys, values, bias


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  is_causal=None, cart_prefixes=None, cart_compaction=None, cart_observer=None,
                  **kwargs):
    import torch
    import torch.nn.functional as F

    if cart_observer is not None:  # computes this layer's attention, seeing its query, key and value
        out = cart_observer(module.layer_idx, query, key, value, scaling, attention_mask)
        return out.transpose(1, 2).contiguous(), None
    if cart_compaction is not None:
        cart_prefixes = cart_compaction.fit(module.layer_idx, query, scaling)
    if cart_prefixes is not None and cart_prefixes.groups:
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):  # BlockMask
            return _flex_attention(module.layer_idx, query, key, value, attention_mask, scaling,
                                   cart_prefixes)
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
    """Attention where rows also attend to shared prefixes (see the module doc): one batched
    call for every row, whatever the number of distinct prefixes."""
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    grouped = query.reshape(b, kv_heads, group * q_len, d)
    allowed = _own_mask(attention_mask, b, group, q_len, key.shape[2], query.device)
    out = _attend(grouped, key, value, allowed, prefixes.layer(layer), scale)
    return out.reshape(b, heads, q_len, d).transpose(1, 2).contiguous(), None


def _own_mask(attention_mask, b: int, group: int, q_len: int, length: int, device):
    """``[B, 1, group * q_len, length]`` bool: which own keys each grouped query may read."""
    import torch

    if attention_mask is None:  # one unpadded row: causal over its own cache
        i = torch.arange(q_len, device=device).unsqueeze(1)
        j = torch.arange(length, device=device).unsqueeze(0)
        allowed = (j <= i + (length - q_len)).view(1, 1, q_len, length).expand(b, 1, q_len, length)
    else:
        allowed = attention_mask[:, :, -q_len:, -length:]
        if allowed.dtype != torch.bool:
            allowed = allowed == 0  # an additive float mask: 0 where attending
    return allowed.unsqueeze(2).expand(b, allowed.shape[1], group, q_len, length).reshape(
        b, allowed.shape[1], group * q_len, length)


def _attend(q, k, v, ok, prefix, scale):
    """``q`` ``[B, kv_heads, n, d]`` over [prefix, own keys ``k``/``v``] (``ok`` masks the
    own ones). Long prompts (prefill, compaction) go in query blocks, so the scores of one
    block at a time are held (~32 MB), not the whole ``[n, p + length]`` matrix. A cartridge
    being trained (its keys need gradients) behind every row takes ``_attend_trained``."""
    import torch

    rows, place = q.shape[2], prefix[3]
    if prefix[0].requires_grad and place.slots == 1 and place.order is None and place.has is None:
        return _attend_trained(q, k, v, ok, prefix, scale)
    batch = max(q.shape[0], place.slots * place.width)
    block = max(256, (1 << 23) // max(1, batch * q.shape[1] * (k.shape[2] + prefix[0].shape[-2])))
    if rows <= block:
        return _attend_block(q, k, v, ok, prefix, scale)
    return torch.cat([_attend_block(q[:, :, i:i + block], k, v, ok[:, :, i:i + block], prefix, scale)
                      for i in range(0, rows, block)], dim=2)


def _attend_block(q, k, v, ok, prefix, scale):
    """One query block: one softmax over [prefix scores (+ biases), own scores]. The prefix
    parts run with the queries grouped by slot (one matmul reading each cartridge once)."""
    import torch

    pk, pv, bias, place = prefix
    n, p = q.shape[2], pk.shape[-2]
    own = torch.matmul(q, k.transpose(-1, -2)) * scale
    own = own.masked_fill(~ok, float("-inf"))
    shared = torch.matmul(place.to_slots(q), pk.transpose(-1, -2)) * scale  # [S, kv, width * n, p]
    if bias is not None:
        shared = shared + bias.to(shared.dtype)  # [S, kv, 1, p]
    shared = place.to_rows(shared, n)
    if place.has is not None:  # no prefix: masked_fill, as -inf + NaN (NaN cartridge) is NaN
        shared = shared.masked_fill(~place.has, float("-inf"))
    probs = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    out = place.to_rows(torch.matmul(place.to_slots(probs[..., :p]), pv), n)
    if place.has is not None:  # 0 * NaN is NaN: drop the prefix's values outright
        out = out.masked_fill(~place.has, 0)
    return out + torch.matmul(probs[..., p:], v)


def _attend_trained(q, k, v, ok, prefix, scale):
    """``_attend`` for the dense training path (``cart distill`` on a CPU, or a flat cartridge on
    any device): one cartridge behind every row, its keys and values needing gradients. Per
    KV head, one fused ``scaled_dot_product_attention`` over [that head's prefix keys, own
    keys] with the biases and ``ok`` as its additive mask, so no ``[n, p + length]`` scores or probabilities are kept
    for the backward, and a flat cartridge's head reads its own keys only (not every head's,
    masked). Measured on one SmolLM2-sized layer (2 threads, float32, 3 x 1024 grouped queries
    of packed conversations behind a flat p=1000 prefix): forward+backward 0.16 s against 0.32
    s by ``_attend``'s query blocks, equal to 1e-6.

    q ``[B, kv, n, d]``; k, v ``[B, kv, L, d]``; ok ``[B, 1 or kv, n, L]`` bool; prefix keys
    and values ``[1, 1 or kv, p, d]``, biases ``[1, kv, 1, p]`` or None -> ``[B, kv, n, d]``."""
    import torch
    import torch.nn.functional as F

    pk, pv, bias, _ = prefix
    b, kv_heads, n, _ = q.shape
    own = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill(~ok, float("-inf"))
    outs = []
    for h in range(kv_heads):
        hk, hv = pk[0, min(h, pk.shape[1] - 1)], pv[0, min(h, pv.shape[1] - 1)]  # [p, d]
        if bias is None:
            prefix_mask = own.new_zeros(b, 1, n, hk.shape[0])
        else:
            hb = bias[0, h, 0]
            mine = torch.isfinite(hb).nonzero().squeeze(1)  # a flat cartridge: this head's keys
            hk, hv = hk.index_select(0, mine), hv.index_select(0, mine)
            prefix_mask = hb.index_select(0, mine).to(q.dtype).expand(b, 1, n, -1)
        keys = torch.cat([hk.expand(b, -1, -1), k[:, h]], dim=1).unsqueeze(1)  # [B, 1, p_h + L, d]
        values = torch.cat([hv.expand(b, -1, -1), v[:, h]], dim=1).unsqueeze(1)
        mask = torch.cat([prefix_mask, own[:, min(h, own.shape[1] - 1)].unsqueeze(1)], dim=-1)
        outs.append(F.scaled_dot_product_attention(q[:, h:h + 1], keys, values, attn_mask=mask,
                                                   scale=scale))
    return torch.cat(outs, dim=1)


# -- training: packed conversations behind one cartridge ---------------------------------------------
def training_attention(device) -> str:
    """The attention path of ``cart distill`` on ``device`` (a str or torch.device): ``flex``
    (``packed_block_mask`` + FlexAttention) or ``dense`` (a ``[B, 1, T, T]`` bool mask +
    ``_prefixed_attention``).

    CUDA: flex -- a compiled fused kernel that skips the masked blocks (other conversations,
    padding) and never materialises the ``[B, heads, T, p + T]`` scores.
    CPU: dense. torch 2.13 has no FlexAttention backward on CPU: the public call refuses
    inputs that need gradients, and the compiled one fails in inductor's backward lowering
    (IndexError). Measured (SmolLM2-135M, float32, 1 thread, a 1 x 1024-token row of 4
    conversations behind a p=128 cartridge, median of 3, process CPU seconds on a shared,
    loaded 2-core machine): forward+backward dense 15.7 s vs eager flex 34.6 s (the math
    reference with torch's device check lifted: it materialises the scores and is slower);
    forward alone (no_grad) dense 9.2 s vs compiled flex 5.3 s (+ ~20 s to compile) -- a win
    training cannot use without a CPU backward. Revisit when torch has one."""
    kind = device if isinstance(device, str) else device.type
    return "flex" if kind.split(":")[0] == "cuda" else "dense"


def packed_mask(segment):
    """``segment`` ``[B, T]`` document id of each token (-1: padding) -> ``[B, 1, T, T]`` bool
    over the own keys: a token sees the earlier tokens of its own conversation only (causal
    within a segment, nothing across segments or from padding). The cartridge (cart_gqa's
    shared prefix) is visible to every query, padding included, so no row is all -inf."""
    import torch

    width = segment.shape[1]
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    causal = torch.ones((width, width), dtype=torch.bool, device=segment.device).tril()
    return (same & causal & (segment.unsqueeze(1) >= 0)).unsqueeze(1)


def packed_block_mask(segment, prefix_len: int):
    """The FlexAttention BlockMask of ``packed_mask`` with the cartridge in front: queries
    ``[T]`` x keys ``[prefix_len + T]`` (cartridge columns always visible), per row, shared
    by the heads. Built once per forward and passed as the model's ``attention_mask`` (a 4D
    mask transformers hands to every layer as is -- with none it would build a dense
    ``[B, 1, T, T]`` mask from the packed position ids)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = segment.shape
    docs = segment
    key_docs = F.pad(docs, (prefix_len, 0), value=-1)  # [B, p + T]: the cartridge is no document

    def mask_mod(row, head, q, kv):
        own = (key_docs[row, kv] == docs[row, q]) & (kv - prefix_len <= q) & (docs[row, q] >= 0)
        return (kv < prefix_len) | own

    # eager (vmap) creation: it briefly holds a [B, T, p + T] bool, once per forward -- small
    # beside the activations, and no recompilation for every new row width
    return create_block_mask(mask_mod, b, None, t, prefix_len + t, device=segment.device)


def _flex_kernel(device_type: str):
    """flex_attention compiled (once, on first use) on CUDA; the eager function elsewhere (the
    math reference, which materialises the scores: tests only, see ``training_attention``)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        import torch

        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _flex_attention(layer: int, query, key, value, block_mask, scaling, prefixes):
    """``query`` ``[B, heads, T, d]`` over [the one cartridge every row reads, own keys ``[B,
    kv_heads, T, d]``] under ``block_mask`` (``packed_block_mask``) -> ``[B, T, heads, d]``.
    The cartridge's K/V are broadcast and concatenated (a ``[B, kv_heads, p + T, d]`` copy,
    through which their gradients flow); its biases, if any, are added to the prefix logits."""
    import torch
    import torch.nn.functional as F

    pk, pv, bias, place = prefixes.layer(layer)  # [S, kv_heads, p, d], [S, kv_heads, 1, p]
    b, heads, t, _ = query.shape
    kv_heads, p = key.shape[1], pk.shape[-2]
    if pk.shape[0] != 1 or place.has is not None or place.order is not None:
        raise ValueError("the FlexAttention path serves one cartridge shared by every row")
    if tuple(block_mask.shape[-2:]) != (t, p + t):
        raise ValueError(f"block mask of {tuple(block_mask.shape)} for {t} queries behind p={p}")
    keys = torch.cat([pk.expand(b, kv_heads, -1, -1), key], dim=2)  # a flat one's [1, 1, p, d] too
    values = torch.cat([pv.expand(b, kv_heads, -1, -1), value], dim=2)
    score_mod = None
    if bias is not None:
        group = heads // kv_heads
        per_key = F.pad(bias[0, :, 0].to(query.dtype), (0, t))  # [kv_heads, p + T], 0 on own keys

        def score_mod(score, row, head, q, kv):
            return score + per_key[head // group, kv]  # query head -> its KV head (as repeat_kv)

    out = _flex_kernel(query.device.type)(query, keys, values, score_mod=score_mod,
                                          block_mask=block_mask, scale=scaling,
                                          enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).contiguous(), None


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
