"""Attention-matching compaction: a corpus's KV cache squeezed into p positions per layer with no
gradient steps (Zweiger, Fu, Guo, Kim 2026, "Fast KV Compaction via Attention Matching").

For every layer and KV head, with the corpus's keys ``K`` and values ``V`` (``[T, d]``, post-RoPE
at positions ``0..T-1``) and reference queries ``Q`` (``[N, d]``: the query heads of that KV
head, at the tokens that follow the corpus):

1. scores ``S = Q K^T * scale`` (``[N, T]``), row-shifted by their maximum ``m``; the corpus's
   attention mass ``M = sum_j exp(S - m)`` (``[N]``) and normalised output ``Y = softmax(S) V``
   (``[N, d]``) are what the compacted prefix must reproduce: the mass decides how much a query
   attends to the prefix against its own tokens, the output what it reads there (the shift
   also weighs the rows of the mass fit: a query whose attention is spread counts more);
2. keys: the sink (position 0, kept whole and frozen) plus the ``p - 1`` corpus keys with the
   highest attention weight of any query (``max_i softmax(S)_ij``);
3. biases ``beta`` (``[p]``, the sink's 0): non-negative least squares for the mass,
   ``min_w ||exp(S_sel - m) w - (M - exp(S_sink - m))||``, ``w >= 0``, ``beta = log w`` -- a
   kept key then stands for the mass of the keys it replaces;
4. values (``[p - 1, d]``): ridge least squares so that the softmax over the kept keys (with
   their biases) times the values reproduces ``Y``, the sink's value fixed.

Layer by layer, on policy: the reference queries are run through the model behind the
compacted prefix, and each layer is fitted inside its attention call to the queries that reach
it -- queries that already went through the compacted earlier layers (one forward pass in all;
``cart.attention`` calls ``fit``). Positions stay where they were: compacted keys keep their
corpus positions, so the queries after the cartridge start at ``T`` (``query_position``).

Budgets (``budget``): *uniform* keeps p - 1 keys in every layer and KV head (a rectangular
cartridge); *global* keeps the same total, ``layers x kv_heads x (p - 1)`` keys, but spends it
where attention needs it: one forward pass reads the corpus and then its reference queries in
one row (a plain causal pass, whose attention ``_Observer`` computes as a split softmax: the
queries' attention over the corpus alone, which the fit needs, is computed once and joined to
their attention over their own tokens), every (layer, head, key) is scored by its highest
attention weight from a reference query, the top scores over the whole model decide how many
keys each head keeps (``allocate``), and each head is fitted with its own count to the queries
of that same pass. So a global budget is fitted off policy, not layer by layer: on
``examples/orbital`` (p=128) that closed 72% of the no-context -> ICL answer-NLL gap against
66% on policy, in half the time. Heads differ a lot: on SmolLM2 a few copy-heavy layers want
thousands of keys, most a dozen. The result is a flat cartridge (``cart.cartridge.flat_layer``): the
same K/V memory as the uniform one, per-key biases masking each head's keys to its own queries.

Reference queries: *repeat-prefill* -- the model reads the corpus, is asked "Repeat the
previous context." and reads it again, so every part of the corpus is looked up by some query --
and, where given, further token sequences (self-study conversations). Both are rendered as they
follow the cartridge (``cart.chat.render_cartridge_ids``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Sequence

from cart.io import CartError

if TYPE_CHECKING:
    import torch

    from cart.cartridge import Cartridge

REPEAT_PROMPT = "Repeat the previous context."
BUDGETS = ("uniform", "global")


@dataclass
class CompactionConfig:
    """``tokens``: p, KV positions per layer (sink included). ``max_queries``: reference query
    vectors per KV head used in the fit (a deterministic subsample beyond it; memory is
    ``N x T`` floats per head). ``ridge``: the values' ridge, relative to the mean eigenvalue of
    the normal matrix. ``nnls_iters``: projected-gradient refinements of the clamped
    least-squares mass fit."""

    tokens: int
    max_queries: int = 8192
    ridge: float = 1e-2
    nnls_iters: int = 300
    seed: int = 0
    bias: bool = True  # False: no per-key biases (mass is then not matched; servable by vLLM)
    # uniform budget: False fits every layer to the queries of the original prefix (a global
    # budget always does: one pass, see the module doc)
    on_policy: bool = True
    select: str = "max"  # key ranking: highest attention of any query (max), rms or mean attention
    bias_bound: float = 3.0  # biases are kept in [-bound, bound] (weights e^-b..e^b)
    budget: str = "uniform"  # uniform: p - 1 keys per layer and head; global: see the module doc

    def __post_init__(self):
        if self.tokens < 2:
            raise CartError(f"-p/--tokens must be at least 2, got {self.tokens}")
        if self.max_queries < 1:
            raise CartError(f"max_queries must be at least 1, got {self.max_queries}")
        if not self.ridge >= 0:
            raise CartError(f"ridge must be >= 0, got {self.ridge}")
        if self.select not in ("max", "rms", "mean"):
            raise CartError(f"select must be max, rms or mean, got {self.select!r}")
        if self.budget not in BUDGETS:
            raise CartError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if not self.bias_bound > 0:
            raise CartError(f"bias_bound must be > 0, got {self.bias_bound}")


def repeat_query_ids(tokenizer: Any, corpus_ids: Sequence[int]) -> list[int]:
    """The repeat-prefill query sequence: the request to repeat the context and the corpus as
    the answer, as the student sees a conversation (no system message)."""
    from cart.chat import render_cartridge_ids

    return render_cartridge_ids(tokenizer, [{"role": "user", "content": REPEAT_PROMPT},
                                            {"role": "assistant", "content": list(corpus_ids)}], False)[0]


def compact(model: Any, prefix_ids: Sequence[int], queries: Sequence[Sequence[int]],
            cfg: CompactionConfig) -> Cartridge:
    """A cartridge of ``cfg.tokens`` positions per layer standing for the KV cache of
    ``prefix_ids`` (T tokens, the first a sink), fitted to the reference query sequences
    ``queries`` (token ids that follow the prefix). ``query_position`` is T; per-layer biases
    ``[kv_heads, p]`` (none when ``cfg.bias`` is off). With ``cfg.budget`` global, a flat
    cartridge of the same K/V memory whose heads keep ``allocate``'s counts. Runs in the
    model's device, fitting in float32/float64."""
    import torch

    from cart.kvcache import prefix_kv

    t = len(prefix_ids)
    if cfg.tokens > t:
        raise CartError(f"-p/--tokens {cfg.tokens} is more than the corpus's {t} tokens: nothing "
                        "to compact (lower -p)")
    if not queries or not all(queries):
        raise CartError("compaction needs at least one non-empty reference query sequence")
    if cfg.budget == "global":
        observer = _Observer(t, cfg)
        _run_queries(model, t, queries, prefix_ids=prefix_ids, cart_observer=observer)
        kv = observer.kv
        counts = allocate(torch.stack([x.rank for x in observer.targets]).cpu(),
                          len(kv) * kv[0][0].shape[0] * (cfg.tokens - 1))
        fitter = _LayerFitter(kv, cfg, counts)
        for layer, ((q, scale), targets) in enumerate(zip(observer.queries, observer.targets)):
            fitter.fit_layer(layer, q, scale, targets)
    else:
        kv = prefix_kv(model, torch.tensor(list(prefix_ids), device=next(model.parameters()).device))
        fitter = _LayerFitter(kv, cfg)
        _run_queries(model, t, queries, cart_compaction=fitter)
    if len(fitter.heads) != len(kv):
        raise RuntimeError(f"compaction fitted {len(fitter.heads)} of {len(kv)} layers: the "
                           "model's attention does not go through cart_gqa")
    return fitter.cartridge({"query_position": t}, kv[0][0].dtype)


def _run_queries(model: Any, t: int, queries: Sequence[Sequence[int]],
                 prefix_ids: Sequence[int] = (), **hooks) -> None:
    """One forward pass of the reference sequences packed into one row, each at positions t,
    t+1, ... and seeing only itself and the prefix: the ``prefix_ids`` themselves, read first in
    the same row (a plain causal pass when there is one sequence), or, without them, the prefix
    ``cart_compaction.fit`` gives every layer. ``hooks``: ``cart_compaction`` or
    ``cart_observer`` (``cart.attention.gqa_attention``)."""
    import torch

    from cart.attention import register

    device = next(model.parameters()).device
    lengths = [len(prefix_ids)] * bool(prefix_ids) + [len(q) for q in queries]
    total = sum(lengths)
    ids = torch.tensor([*prefix_ids, *(i for q in queries for i in q)], device=device).unsqueeze(0)
    positions = torch.cat([torch.arange(len(prefix_ids))] + [torch.arange(t, t + len(q)) for q in queries])
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(device)
    mask = None  # the prefix and one sequence after it: causal
    if len(queries) > 1 or not prefix_ids:
        causal = torch.ones((total, total), dtype=torch.bool, device=device).tril()
        seen = segment.unsqueeze(0) == segment.unsqueeze(1)
        if prefix_ids:  # every sequence sees the prefix (segment 0)
            seen |= (segment == 0).unsqueeze(0)
        mask = (causal & seen).view(1, 1, total, total)
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=mask, position_ids=positions.to(device).unsqueeze(0),
                        use_cache=False, **hooks)
    finally:
        model.set_attn_implementation(previous)


def reference_queries(kv_heads: int, cfg: CompactionConfig, query: torch.Tensor,
                      *per_query: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``query`` ``[B, heads, L, d]`` -> ``[kv_heads, N, d]`` float32: the queries of every
    token (one packed row) and query head, grouped under their KV head (head h uses KV head
    h // group), subsampled to ``cfg.max_queries``; each of ``per_query`` (``[B, heads, L,
    ...]``: what those queries attend to) grouped and subsampled the same way, alongside."""
    import torch

    b, heads, length = query.shape[:3]
    group = heads // kv_heads
    n = b * length * group
    pick = None
    if n > cfg.max_queries:
        gen = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(n, generator=gen)[:cfg.max_queries].sort().values.to(query.device)
    out = []
    for x in (query, *per_query):
        rest = x.shape[3:]
        x = x.transpose(1, 2).reshape(b * length, kv_heads, group, *rest).transpose(0, 1)
        x = x.reshape(kv_heads, n, *rest)
        out.append((x if pick is None else x[:, pick]).float())
    return tuple(out)


def attend_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    causal: bool = False, mask: torch.Tensor | None = None, fused: bool | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp: ``query`` ``[B, heads, n, d]``, ``key``/``value`` ``[B,
    kv_heads, t, d]`` (head h reads KV head h // group), ``causal`` (n = t) or ``mask`` (bool,
    broadcasting to ``[B, heads, n, t]``) -> the output ``[B, heads, n, d]`` and ``log sum_j
    exp(scores)`` ``[B, heads, n]``: what joins attention over two sets of keys (split softmax).
    ``fused`` (default: on a CPU): PyTorch's fused flash kernel, which holds no ``[n, t]``
    scores; otherwise plain maths (other devices have the memory)."""
    import torch

    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, float("-inf"))
    if fused is None:
        fused = query.device.type == "cpu"
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=mask, scale=scale)
    group = query.shape[1] // key.shape[1]
    scores = torch.matmul(query, key.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    if causal:
        scores = scores + torch.full(scores.shape[-2:], float("-inf"), device=scores.device).triu(1)
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul((scores - lse.unsqueeze(-1)).exp(), value.repeat_interleave(group, 1)), lse


def allocate(scores: torch.Tensor, total: int) -> torch.Tensor:
    """``scores`` ``[layers, kv_heads, T]`` (each key's highest attention weight from any
    reference query; the sink's column is ignored) -> ``[layers, kv_heads]`` how many non-sink
    keys each head keeps: the ``total`` best scores over the whole model."""
    import torch

    layers, heads, t = scores.shape
    ranked = scores[:, :, 1:].reshape(-1)
    chosen = ranked.topk(min(total, ranked.numel())).indices // (t - 1)  # (layer, head) of each
    return torch.bincount(chosen, minlength=layers * heads).view(layers, heads)


class _Observer:
    """The one pass of a global budget (``cart_observer`` of ``cart.attention.gqa_attention``):
    the corpus and its reference queries read in one row. It keeps the corpus's K/V (``kv``: per
    layer ``[kv_heads, T, d]``), the queries that follow it (``queries``: per layer
    ``[kv_heads, N, d]`` and the scale) and what the corpus gives them (``targets``: per layer
    ``AttentionTargets``, whose ``rank`` scores every key for ``allocate``) -- so each head's
    fit later needs only its kept keys' scores. It also computes the layer's attention for the
    pass (split softmax): the queries' attention over the corpus alone, which the targets need,
    is joined to their attention over their own tokens by the two log-sum-exps, so the corpus
    part is computed once, not once for the pass and again for the targets."""

    def __init__(self, t: int, cfg: CompactionConfig):
        self.t, self.cfg = t, cfg
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.queries: list[tuple[torch.Tensor, float]] = []
        self.targets: list[AttentionTargets] = []

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scaling: float | None, mask: torch.Tensor | None) -> torch.Tensor:
        """``query`` ``[1, heads, T + L, d]``, ``key``/``value`` ``[1, kv_heads, T + L, d]``,
        ``mask`` None (causal) or ``[1, 1, T + L, T + L]`` bool (packed query sequences) -> the
        layer's attention output ``[1, heads, T + L, d]``."""
        import torch

        if layer != len(self.kv):
            raise RuntimeError(f"layers reached out of order: {layer} after {len(self.kv) - 1}")
        t = self.t
        keys, values = key[0, :, :t].clone(), value[0, :, :t].clone()
        self.kv.append((keys, values))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        corpus, _ = attend_with_lse(query[:, :, :t], key[:, :, :t], value[:, :, :t], scale, causal=True)
        seen, lse_seen = attend_with_lse(query[:, :, t:], key[:, :, :t], value[:, :, :t], scale)
        own_mask = None if mask is None else mask[:, :, t:, t:]
        own, lse_own = attend_with_lse(query[:, :, t:], key[:, :, t:], value[:, :, t:], scale,
                                       causal=mask is None, mask=own_mask)
        lse = torch.logaddexp(lse_seen, lse_own)
        tail = (seen * (lse_seen - lse).exp().unsqueeze(-1) + own * (lse_own - lse).exp().unsqueeze(-1))
        q, seen, lse_seen = reference_queries(keys.shape[0], self.cfg, query[:, :, t:], seen, lse_seen)
        self.queries.append((q, scale))
        self.targets.append(attention_targets(keys, values, q, scale, self.cfg.select,
                                              attended=(seen, lse_seen)))
        return torch.cat([corpus, tail.to(corpus.dtype)], dim=2)


class _LayerFitter:
    """Fits each layer, when the forward pass reaches its attention, to the queries that reach
    it (``cart.attention.gqa_attention`` calls ``fit``), and returns the compacted prefix for the
    rest of that attention call. ``counts`` (``[layers, kv_heads]``, a global budget) gives each
    head its own number of non-sink keys; None: ``cfg.tokens - 1`` each."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], cfg: CompactionConfig,
                 counts: torch.Tensor | None = None):
        self.kv, self.cfg, self.counts = kv, cfg, counts
        # per layer, per KV head: (keys [n + 1, d], values [n + 1, d], biases [n + 1]), sink first
        self.heads: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        # on policy (``fit``): the fitted layers as the rest of the pass attends to them
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # [kv_heads, p, d]
        self.biases: list[torch.Tensor] = []  # [kv_heads, p]

    def fit(self, layer: int, query: torch.Tensor, scaling: float | None):
        """``query``: ``[B, heads, L, d]`` post-RoPE; returns ``SharedPrefixes`` over every row."""
        from cart.attention import SharedPrefixes

        import torch

        keys, _ = self.kv[layer]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        self.fit_layer(layer, reference_queries(keys.shape[0], self.cfg, query)[0], scale)
        if not self.cfg.on_policy:  # later layers see what the whole prefix gives
            return SharedPrefixes([(list(range(query.shape[0])), self.kv, None)], query.shape[0])
        heads = self.heads[-1]  # the rest of the pass attends to the fitted layer, as it is
        self.layers.append((torch.stack([k for k, _, _ in heads]).to(query.dtype),
                            torch.stack([v for _, v, _ in heads]).to(query.dtype)))
        if self.cfg.bias:
            self.biases.append(torch.stack([b for _, _, b in heads]))
        return SharedPrefixes([(list(range(query.shape[0])), self.layers,
                                self.biases if self.cfg.bias else None)], query.shape[0])

    def fit_layer(self, layer: int, q: torch.Tensor, scale: float,
                  targets: AttentionTargets | None = None) -> None:
        """Fit layer ``layer`` to the reference queries ``q`` ``[kv_heads, N, d]`` (``heads``);
        ``targets``: what the corpus gives them, when already computed."""
        if layer != len(self.heads):
            raise RuntimeError(f"layers reached out of order: {layer} after {len(self.heads) - 1}")
        keys, values = self.kv[layer]
        if self.counts is None:
            k, v, bias = fit_head_group(keys, values, q, scale, self.cfg, targets)
            self.heads.append([(k[h], v[h], bias[h]) for h in range(k.shape[0])])
        else:
            self.heads.append([self._fit_head(keys[h:h + 1], values[h:h + 1], q[h:h + 1], scale,
                                              int(self.counts[layer, h]),
                                              None if targets is None else targets.head(h))
                               for h in range(keys.shape[0])])

    def _fit_head(self, keys, values, q, scale: float, kept: int, targets: AttentionTargets | None):
        """One KV head keeping ``kept`` keys besides its sink (``[1, T, d]`` K/V, ``[1, N, d]``
        queries) -> its keys, values ``[kept + 1, d]`` and biases ``[kept + 1]``."""
        import torch

        if kept == 0:  # the sink alone
            return keys[0, :1].float(), values[0, :1].float(), torch.zeros(1, device=keys.device)
        k, v, bias = fit_head_group(keys, values, q, scale, replace(self.cfg, tokens=kept + 1), targets)
        return k[0], v[0], bias[0]

    def cartridge(self, metadata: dict[str, Any], dtype) -> Cartridge:
        """The fitted layers as a cartridge in ``dtype``: rectangular (a uniform budget; biases
        when ``cfg.bias``), or flat (a global one, ``cart.cartridge.flat_layer``)."""
        import torch

        from cart.cartridge import Cartridge

        if self.counts is None:
            k = [torch.stack([hk for hk, _, _ in heads]) for heads in self.heads]
            v = [torch.stack([hv for _, hv, _ in heads]) for heads in self.heads]
            biases = ([torch.stack([hb for _, _, hb in heads]).float().cpu() for heads in self.heads]
                      if self.cfg.bias else None)
            return Cartridge(frozen_keys=[x[:, :1].to(dtype).contiguous() for x in k],
                             frozen_values=[x[:, :1].to(dtype).contiguous() for x in v],
                             keys=[x[:, 1:].to(dtype).contiguous() for x in k],
                             values=[x[:, 1:].to(dtype).contiguous() for x in v],
                             metadata=metadata, biases=biases)
        from cart.cartridge import flat_layer

        return Cartridge.from_flat_layers(
            [(k.to(dtype).contiguous(), v.to(dtype).contiguous(), b.float().cpu()) for k, v, b in
             (flat_layer([hk for hk, _, _ in heads], [hv for _, hv, _ in heads],
                         [hb if self.cfg.bias else hb * 0 for _, _, hb in heads])
              for heads in self.heads)], metadata)


@dataclass
class AttentionTargets:
    """What a corpus's KV cache gives ``N`` reference queries of ``H`` KV heads, which the
    compacted prefix must reproduce (float32): each row's largest score ``shift`` ``[H, N, 1]``;
    the attention mass ``mass`` ``[H, N]`` (``sum_j exp(S - shift)``) and the sink's part of it
    ``sink``; the attention output ``output`` ``[H, N, d]``; and ``rank``
    ``[H, T]``, each key's score for keeping it (the sink's -inf: it is kept anyway)."""

    shift: torch.Tensor
    mass: torch.Tensor
    sink: torch.Tensor
    output: torch.Tensor
    rank: torch.Tensor

    def head(self, h: int) -> AttentionTargets:
        """The targets of KV head ``h`` alone (``H`` = 1)."""
        return AttentionTargets(*(getattr(self, f.name)[h:h + 1] for f in fields(self)))


def attention_targets(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                      scale: float, select: str = "max",
                      attended: tuple[torch.Tensor, torch.Tensor] | None = None) -> AttentionTargets:
    """``keys``/``values`` ``[H, T, d]`` (position 0 the sink), ``queries`` ``[H, N, d]`` ->
    their ``AttentionTargets``; ``rank`` by ``select``: each key's highest attention weight from
    any query (max), its mean or its root mean square. ``attended``: the queries' attention
    output ``[H, N, d]`` and log-sum-exp ``[H, N]`` over these keys, if already computed
    (``attend_with_lse``).

    The output and log-sum-exp come from one fused attention; one more pass over the scores
    gives each row's maximum and each key's rank: ``[Q*scale, -lse] . [K, 1]`` is the log
    attention weight ``S - lse`` straight out of the matmul. Per head and in blocks of 64
    queries (~1 MB of scores at a time, which stays in cache: writing the whole ``[N, T]``
    matrix cost more than the maths)."""
    import torch

    k32, v32 = keys.float(), values.float()
    if attended is None:
        output, lse = attend_with_lse(queries[None], k32[None], v32[None], scale)
        attended = output[0], lse[0]
    output, lse = attended
    logq = torch.cat([queries * scale, -lse.unsqueeze(-1)], dim=-1)  # [H, N, d + 1]
    logk = torch.cat([k32, torch.ones_like(k32[..., :1])], dim=-1).transpose(1, 2)  # [H, d + 1, T]
    heads, n = queries.shape[:2]
    row_max = torch.empty(heads, n, device=queries.device)  # max_j (S - lse)
    sink_log = torch.empty(heads, n, device=queries.device)  # the sink's S - lse
    rank = torch.empty(heads, keys.shape[1], device=queries.device)
    for h in range(heads):
        best = None
        for i in range(0, n, 64):
            logw = torch.matmul(logq[h, i:i + 64], logk[h])  # [b, T]: log softmax(S)
            row_max[h, i:i + 64] = logw.amax(dim=-1)
            sink_log[h, i:i + 64] = logw[:, 0]
            if select == "max":
                part = logw.amax(dim=0)
            else:
                part = logw.exp_() if select == "mean" else logw.mul_(2).exp_()
                part = part.sum(dim=0)
            best = part if best is None else torch.maximum(best, part) if select == "max" else best + part
        rank[h] = best.exp() if select == "max" else best / n if select == "mean" else (best / n).sqrt()
    rank[:, 0] = float("-inf")
    shift = row_max + lse  # max_j S
    return AttentionTargets(shift.unsqueeze(-1), torch.exp(-row_max), torch.exp(sink_log - row_max),
                            output, rank)


def fit_head_group(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, scale: float,
                   cfg: CompactionConfig, targets: AttentionTargets | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer: ``keys``/``values`` ``[H, T, d]`` (position 0 the sink), ``queries``
    ``[H, N, d]`` -> compacted keys and values ``[H, p, d]`` (sink first) and biases ``[H, p]``
    (the sink's 0), float32. ``targets``: ``attention_targets`` of the same, if computed."""
    import torch

    if targets is None:
        targets = attention_targets(keys, values, queries, scale, cfg.select)
    p = cfg.tokens
    k32, v32 = keys.float(), values.float()
    chosen = targets.rank.topk(p - 1, dim=-1).indices.sort(dim=-1).values  # [H, p-1]
    index = torch.cat([torch.zeros_like(chosen[:, :1]), chosen], dim=1)  # [H, p]
    kept_keys = torch.gather(k32, 1, index.unsqueeze(-1).expand(-1, -1, k32.shape[-1]))
    kept_scores = torch.matmul(queries, kept_keys.transpose(1, 2)).mul_(scale).sub_(targets.shift)  # [H, N, p]
    if cfg.bias:
        bound = math.exp(cfg.bias_bound)
        w = nnls(kept_scores[:, :, 1:].exp(), targets.mass - targets.sink, cfg.nnls_iters,
                 1 / bound, bound)  # [H, p-1]
        bias = torch.cat([torch.zeros_like(w[:, :1]), torch.log(w)], dim=1).float()
    else:
        bias = torch.zeros(kept_keys.shape[:2], device=kept_keys.device)
    probs = torch.softmax(kept_scores + bias.unsqueeze(1), dim=-1)  # [H, N, p]
    residual = targets.output - probs[:, :, :1] * v32[:, :1]  # the sink's part is fixed
    # ridge toward each kept key's own value: a key few reference queries attend to keeps
    # (nearly) its value instead of the huge one least squares would give it
    fitted = ridge_solve(probs[:, :, 1:], residual, cfg.ridge, torch.gather(
        v32, 1, chosen.unsqueeze(-1).expand(-1, -1, v32.shape[-1])))  # [H, p-1, d]
    kept_values = torch.cat([v32[:, :1], fitted], dim=1)
    return kept_keys, kept_values, bias


def nnls(a: torch.Tensor, y: torch.Tensor, iters: int, low: float, high: float) -> torch.Tensor:
    """Batched box-constrained least squares ``min_w ||a w - y||, low <= w <= high`` for ``a``
    ``[H, N, k]``, ``y`` ``[H, N]``: the least-squares solution clamped into the box, refined by
    ``iters`` steps of accelerated projected gradient on the normal equations (float64: the
    mass fit is near singular, a float32 sum already moves a p = T compaction off exact)."""
    import torch

    a64, y64 = a.double(), y.double()
    gram = torch.matmul(a64.transpose(1, 2), a64)  # [H, k, k]
    rhs = torch.matmul(a64.transpose(1, 2), y64.unsqueeze(-1)).squeeze(-1)  # [H, k]
    w = spd_solve(gram, rhs.unsqueeze(-1), 1e-10).squeeze(-1).clamp(low, high)
    if iters:
        # the Frobenius norm bounds the largest eigenvalue from above (a safe step) at O(k^2);
        # the exact spectral norm (an SVD) cost more than the rest of the fit together
        lipschitz = torch.linalg.matrix_norm(gram).clamp_min(1e-30)  # [H]
        step = (1.0 / lipschitz).unsqueeze(-1)
        z, previous, momentum = w.clone(), w.clone(), 1.0
        for _ in range(iters):
            grad = torch.matmul(gram, z.unsqueeze(-1)).squeeze(-1) - rhs
            w = (z - step * grad).clamp(low, high)
            following = (1 + (1 + 4 * momentum * momentum) ** 0.5) / 2
            z = w + ((momentum - 1) / following) * (w - previous)
            previous, momentum = w, following
    return w.float()


def ridge_solve(x: torch.Tensor, y: torch.Tensor, ridge: float, prior: torch.Tensor) -> torch.Tensor:
    """Batched ``argmin_c ||x c - y||^2 + lam ||c - prior||^2`` for ``x`` ``[H, N, k]``, ``y``
    ``[H, N, d]``, ``prior`` ``[H, k, d]``; ``lam`` = ``ridge`` x the mean eigenvalue of
    ``x^T x`` (summed in float32, which the ridge makes plenty; solved in float64)."""
    import torch

    gram = torch.matmul(x.transpose(1, 2), x).double()
    lam = (ridge * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30))[:, None, None]
    return spd_solve(gram, torch.matmul(x.transpose(1, 2), y).double() + lam * prior.double(),
                     ridge).float()


def spd_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(gram + lam I)^-1 rhs`` for symmetric positive semi-definite ``gram`` ``[H, k, k]``,
    ``lam`` = ``ridge`` x its mean eigenvalue, by Cholesky (raising the ridge tenfold where a
    factorisation fails)."""
    import torch

    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * 10 ** attempt * scale * eye)
        if not info.any():
            return torch.cholesky_solve(rhs, factor)
    raise RuntimeError("compaction: the normal equations cannot be factorised (non-finite queries?)")
