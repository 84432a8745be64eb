"""The transformers engine: batched generation with left padding and a KV cache, written as a
plain decode loop so the teacher's top-k log-probs come from the raw logits (before temperature)
at no extra forward pass.

Batches are continuous (iteration-level): ``TransformersBatch`` lets requests join between
decode steps and leave as soon as they finish, so ``cart serve`` decodes concurrent requests --
for different cartridges or none -- in shared forward passes, and ``generate`` is the same loop
run until a fixed set of requests is done. A cartridge is never copied into the rows' caches:
rows attend to it where it is stored (``cart.attention.SharedPrefixes``), once per cartridge; a
batch mixing several cartridges also holds them once more, stacked and padded, so that each
layer attends for every row in one batched call that reads each cartridge once, with no per-row
copy (the stack is kept while the batch's rows do not change). Newcomers joining a batch are
prefilled together: one left-padded forward pass per sub-batch of at most
``TransformersEngine.prefill_tokens`` padded tokens (see ``TransformersEngine.prefill_rows``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer  # (this module is imported only to run a model)

from cart.engines.base import (NON_FINITE, Engine, Generation, GenerationRequest, KVPrefix, RunningBatch,
                               ScoreRequest, StepEvent, TopK, eos_token_ids, finite_rows, loop_start,
                               sample_token)
from cart.io import CartError
from cart.models import context_length

# Padded tokens (rows x (stored prefix + prompt columns)) one batched prefill forward pass may
# hold: its activations and cache grow with it, and so does its mask when rows are padded
# (``[B, 1, T, P + T]`` bool, expanded per query head group in attention: rows x T x this x
# group bytes). 32 newcomers of 4k tokens go in 16 passes of 2 (a longer prompt alone, unmasked);
# 8k tokens a pass keeps a GPU's matmuls large.
PREFILL_TOKENS = 8192


def kv_nbytes(layers: list[tuple[Any, Any]]) -> int:
    """Bytes of per-layer (keys, values) tensors."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


class TransformersEngine(Engine):
    def __init__(self, model: Any, tokenizer: Any, identity: Any,
                 prefix_cache_bytes: int = 4 << 30, prefill_tokens: int = PREFILL_TOKENS):
        from cart.attention import register

        # cart_gqa reads the shared KV prefixes (cartridges): without it they would be ignored
        model.set_attn_implementation(register())
        self.model = model
        # KV of shared prompt prefixes (a chunk's system prompt, used by A and then by B),
        # least recently used first; bounded in bytes.
        self._prefixes: dict[tuple, list[tuple[Any, Any]]] = {}
        self._prefix_cache_bytes = prefix_cache_bytes
        self.prefill_tokens = prefill_tokens
        # Whether a prefill pass pads rows to batch prompts of different lengths. A GPU runs
        # a batch in about the time of one row, so padding pays; a CPU's time grows with the
        # tokens run, padding included (measured: 8 x 285-315 tokens, one padded pass 5%
        # slower than a pass each), so there only rows of the same lengths share a pass.
        self.prefill_pads = model.device.type != "cpu"
        # KV prefixes (cartridges) in the model's dtype/device, one copy per KVPrefix object
        self._prefix_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.tokenizer = tokenizer
        self.identity = identity
        self.eos_token_ids = eos_token_ids(
            model.generation_config.eos_token_id if model.generation_config else None, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.max_context = context_length(model.config)

    @classmethod
    def load(cls, model: str | None, dtype: str = "float32", device: str = "cpu", console=None):
        from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

        ref = resolve_model(model, console)
        tokenizer = load_tokenizer(ref)
        hf_model = load_model(ref, dtype=dtype, device=device)
        return cls(hf_model, tokenizer, ModelIdentity.of(ref, hf_model.config, tokenizer))

    def open_batch(self) -> TransformersBatch:
        """An empty running batch: requests join it and leave it between decode steps."""
        return TransformersBatch(self)

    def generate(self, requests: list[GenerationRequest], seed: int) -> list[Generation]:
        import torch

        batch = self.open_batch()
        rows = batch.add(requests, [r.seed if r.seed is not None else seed * 1_000_003 + i
                                    for i, r in enumerate(requests)])
        with torch.inference_mode():
            while len(batch):
                for ev in batch.step():
                    if ev.error is not None:
                        raise CartError(f"generation failed: {ev.error}")
        return [row.out for row in rows]

    def _stored_prefix(self, prompt_ids: list[int], prefix_len: int, kv_prefix: KVPrefix | None):
        """(the stored per-layer ``[1, kv_heads, prefix_len, d]`` K/V of the request's shared
        prompt prefix, or None; the first prompt index still to run)."""
        if 0 < prefix_len < len(prompt_ids):
            return self._prefix_kv(prompt_ids[:prefix_len], kv_prefix), prefix_len
        return None, 0

    def _positions(self, kv_prefix: KVPrefix | None, start: int, end: int):
        """Position ids of prompt tokens ``start..end-1`` (after the KV prefix, if any)."""
        import torch

        first = 0 if kv_prefix is None else kv_prefix.query_position
        return torch.arange(first + start, first + end, device=self.model.device).unsqueeze(0)

    def prefix_layers(self, kv_prefix: KVPrefix) -> list[tuple[Any, Any]]:
        """The KV prefix's per-layer ``[kv_heads, p, d]`` tensors in the model's dtype and
        device, converted once per KVPrefix object and shared by every request using it."""
        return self._prefix_tensors(kv_prefix)[0]

    def _prefix_tensors(self, kv_prefix: KVPrefix):
        """(per-layer K/V, per-layer biases or None) on the model's device, converted once."""
        tensors = self._prefix_layers.get(kv_prefix)
        if tensors is None:
            dtype, device = self.model.dtype, self.model.device
            layers = [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))
                      for k, v in kv_prefix.kv]
            bias = None if kv_prefix.bias is None else [b.to(device) for b in kv_prefix.bias]
            tensors = self._prefix_layers[kv_prefix] = (layers, bias)
        return tensors

    def prefix_group(self, rows: list[int], kv_prefix: KVPrefix):
        """One ``SharedPrefixes`` group: ``rows`` of a batch behind ``kv_prefix``."""
        return (rows, *self._prefix_tensors(kv_prefix))

    def shared_prefix(self, kv_prefix: KVPrefix | None):
        """The ``cart_prefixes`` argument of a one-row forward pass behind ``kv_prefix``."""
        return self.shared_prefixes([kv_prefix])

    def shared_prefixes(self, kv_prefixes: list[KVPrefix | None], previous=None):
        """The ``cart_prefixes`` of a batch whose row i is behind ``kv_prefixes[i]``: one group
        per KV prefix object (each is read once per layer), rows behind none in no group; None
        when no row has one. ``previous``: see ``SharedPrefixes``."""
        from cart.attention import SharedPrefixes

        by_prefix: dict[int, tuple[KVPrefix, list[int]]] = {}
        for i, p in enumerate(kv_prefixes):
            if p is not None:
                by_prefix.setdefault(id(p), (p, []))[1].append(i)
        groups = [self.prefix_group(rows, p) for p, rows in by_prefix.values()]
        return SharedPrefixes(groups, len(kv_prefixes), previous=previous) if groups else None

    def prefill(self, request: GenerationRequest):
        """Run one prompt alone after its KV prefix and the stored KV of its shared prompt
        prefix. Returns (per-layer ``[1, kv_heads, n, d]`` K/V of the prompt, last-position
        logits ``[vocab]``)."""
        import torch

        (pieces,), logits, _ = self.prefill_rows([request])
        return [tuple(torch.cat(part, dim=2) for part in zip(*layer)) for layer in pieces], logits[0]

    def prefill_parts(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """Indices of ``requests`` split into sub-batches for ``prefill_rows``: each holds at
        most ``prefill_tokens`` padded tokens (rows x (longest stored prefix + longest rest of
        a prompt)), or is one request; without ``prefill_pads``, only rows of the same lengths.
        Sorted by length first, so that rows of like lengths share a pass and little is
        padding."""
        def sizes(i):
            r = requests[i]
            start = self._stored_prefix_len(r)
            return len(r.prompt_ids) - start, start

        parts: list[list[int]] = []
        width = (0, 0)  # (longest rest of a prompt, longest stored prefix) of the last part
        for i in sorted(range(len(requests)), key=sizes):
            n, s = sizes(i)
            grown = (max(width[0], n), max(width[1], s))
            if parts and (len(parts[-1]) + 1) * sum(grown) <= self.prefill_tokens and (
                    self.prefill_pads or grown == (n, s) == width):
                parts[-1].append(i)
                width = grown
            else:
                parts.append([i])
                width = (n, s)
        return parts

    @staticmethod
    def _stored_prefix_len(r: GenerationRequest) -> int:
        """Prompt tokens of ``r`` whose KV comes from the prefix store (``_stored_prefix``)."""
        return r.prefix_len if 0 < r.prefix_len < len(r.prompt_ids) else 0

    def prefill_rows(self, requests: list[GenerationRequest], previous=None):
        """Prefill ``requests`` in one forward pass (callers keep it within ``prefill_tokens``:
        ``prefill_parts``). Row i's columns: its stored prompt prefix (s_i tokens) right-aligned
        in a past of P = max s columns, then its remaining n_i prompt tokens right-aligned
        (left-padded) in T = max n columns; so every row's last token is the last column
        (``logits_to_keep=1``). The mask (``_prefill_mask``) hides the gaps; position ids are
        given per row (after the row's KV prefix, if any); each KV prefix (cartridge) is a group
        of ``shared_prefixes``, read where it is stored (``previous``: see ``SharedPrefixes``).

        Returns (per row, per layer, the ``(k, v)`` pieces ``[1, kv_heads, m, d]`` that laid end
        to end are the row's own K/V -- views into the pass's cache, no copy; last-position
        logits ``[B, vocab]`` float; the pass's ``SharedPrefixes`` or None)."""
        import torch

        stored = [self._stored_prefix(r.prompt_ids, r.prefix_len, r.kv_prefix) for r in requests]
        starts = [s for _, s in stored]
        news = [len(r.prompt_ids) - s for r, s in zip(requests, starts)]
        P, T = max(starts), max(news)
        ids = torch.full((len(requests), T), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(requests), T), dtype=torch.long)
        for i, (r, s, n) in enumerate(zip(requests, starts, news)):
            ids[i, T - n:] = torch.tensor(r.prompt_ids[s:])
            first = (r.kv_prefix.query_position if r.kv_prefix else 0) + s
            positions[i] = first + (torch.arange(T) - (T - n)).clamp(min=0)  # padding: any
        cache = self._prefill_past([kv for kv, _ in stored], P, T)
        device = self.model.device
        shared = self.shared_prefixes([r.kv_prefix for r in requests], previous=previous)
        out = self.model(input_ids=ids.to(device), position_ids=positions.to(device),
                         attention_mask=_prefill_mask(starts, news, device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1, cart_prefixes=shared)
        pieces = [[[(layer.keys[i:i + 1, :, P - s:P], layer.values[i:i + 1, :, P - s:P])] * (s > 0)
                   + [(layer.keys[i:i + 1, :, P + T - n:], layer.values[i:i + 1, :, P + T - n:])]
                   for layer in cache.layers] for i, (s, n) in enumerate(zip(starts, news))]
        return pieces, out.logits[:, -1].float(), shared

    def _prefill_past(self, stored: list, P: int, T: int):
        """The cache a ``prefill_rows`` pass (or one ``score`` row) starts from: each row's
        stored prompt-prefix K/V (``stored[i]``: per-layer ``[1, kv_heads, s_i, d]``, or None)
        right-aligned in P zero-filled columns, in buffers ``[B, kv_heads, P + T, d]`` the pass
        writes its T columns into (no concatenation). Empty when no row has a stored prefix."""
        from transformers import DynamicCache

        if P == 0:
            return DynamicCache(config=self.model.config)
        kv0 = next(kv for kv in stored if kv is not None)
        keys, values = [], []
        for layer, (k0, _) in enumerate(kv0):
            k = k0.new_zeros((len(stored), k0.shape[1], P + T, k0.shape[3]))
            v = k.clone()
            for i, kv in enumerate(stored):
                if kv is not None:
                    s = kv[layer][0].shape[2]
                    k[i, :, P - s:P], v[i, :, P - s:P] = kv[layer][0][0], kv[layer][1][0]
            keys.append(k)
            values.append(v)
        return preallocated_cache(self.model, keys, values, P)

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        import torch

        out = []
        with torch.inference_mode():
            for r in requests:
                if not 0 < r.target_start < len(r.prompt_ids):
                    raise ValueError(f"target_start {r.target_start} outside 1..{len(r.prompt_ids) - 1}")
                prefix_len = min(r.prefix_len, r.target_start - 1)
                stored, start = self._stored_prefix(r.prompt_ids, prefix_len, r.kv_prefix)
                ids = r.prompt_ids[start:]
                row = self._prefill_past([stored], start, len(ids))
                logits = self.model(input_ids=torch.tensor([ids], device=self.model.device),
                                    position_ids=self._positions(r.kv_prefix, start, len(r.prompt_ids)),
                                    past_key_values=row, use_cache=True,
                                    cart_prefixes=self.shared_prefix(r.kv_prefix)).logits[0].float()
                first = r.target_start - start  # index in ids of the first target
                logp = torch.log_softmax(logits[first - 1:-1], dim=-1)
                gold = torch.tensor(ids[first:], device=logp.device).unsqueeze(1)
                out.append(logp.gather(1, gold).squeeze(1).cpu().tolist())
        return out

    def _prefix_kv(self, prefix: list[int], kv_prefix: KVPrefix | None = None) -> list[tuple[Any, Any]]:
        """KV of a shared prompt prefix (computed after ``kv_prefix``, which it does not
        include), LRU-cached in bytes."""
        import torch
        from transformers import DynamicCache

        key = (kv_prefix.key if kv_prefix else None, tuple(prefix))
        kv = self._prefixes.pop(key, None)
        if kv is None:
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([prefix], device=self.model.device),
                           past_key_values=cache, use_cache=True, logits_to_keep=1,
                           position_ids=self._positions(kv_prefix, 0, len(prefix)),
                           cart_prefixes=self.shared_prefix(kv_prefix))
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefixes[key] = kv  # most recently used last
        while len(self._prefixes) > 1 and sum(map(kv_nbytes, self._prefixes.values())) > self._prefix_cache_bytes:
            self._prefixes.pop(next(iter(self._prefixes)))
        return kv


@dataclass(eq=False)
class BatchRow:
    """One request in a running batch; ``out`` grows by a token per step."""

    request: GenerationRequest
    generator: Any  # torch.Generator: its draws depend on no other request
    out: Generation
    length: int  # tokens in the row's own cache (prompt, then the generated ones fed back)
    position: int  # position id of the next token fed back


class TransformersBatch(RunningBatch):
    """A running batch: per-row caches laid out left-padded in preallocated buffers (decoding
    writes in place), a mask, next positions and pending next-token logits. ``add`` prefills
    newcomers together (``TransformersEngine.prefill_rows``, a forward pass per sub-batch) and
    lays every row out again; ``step`` picks a token for every row, drops the finished ones and
    runs one forward pass for the rest."""

    def __init__(self, engine: TransformersEngine):
        self.engine = engine
        self.rows: list[BatchRow] = []
        self.cache = self.mask = self.positions = self.logits = None
        self._groups = None  # SharedPrefixes of the current rows

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: list[GenerationRequest], seeds: list[int]) -> list[BatchRow]:
        import torch

        if not requests:
            return []
        if any(r.max_new_tokens < 1 for r in requests):
            raise ValueError("max_new_tokens must be >= 1")
        engine = self.engine
        kvs, logits = [None] * len(requests), [None] * len(requests)
        # The padded stack of several cartridges (cart.attention) is handed from pass to pass
        # and on to the batch, so that it is built once where it serves them all.
        stacked = self._groups
        with torch.inference_mode():
            for part in engine.prefill_parts(requests):  # one forward pass each
                pieces, last, shared = engine.prefill_rows([requests[i] for i in part], stacked)
                for j, i in enumerate(part):
                    kvs[i], logits[i] = pieces[j], last[j]
                if shared is not None and shared.stacked_nbytes():
                    stacked = shared
            fresh = []
            for r, seed in zip(requests, seeds):
                first = r.kv_prefix.query_position if r.kv_prefix else 0
                fresh.append(BatchRow(r, torch.Generator(device="cpu").manual_seed(seed),
                                      Generation([], False), len(r.prompt_ids), first + len(r.prompt_ids)))
            self._lay_out(fresh, kvs, torch.stack(logits), stacked)
        return fresh

    def _lay_out(self, fresh: list[BatchRow], kvs: list, logits, stacked=None) -> None:
        """Copy the current rows and the newcomers into new left-padded buffers just wide
        enough for the longest row and with room for every token still to come. ``kvs[i]``:
        newcomer i's per-layer list of ``(k, v)`` pieces ``[1, kv_heads, m, d]`` that laid end
        to end are its own K/V (``TransformersEngine.prefill_rows``); ``logits``: their
        ``[len(fresh), vocab]`` next-token scores; ``stacked``: a ``SharedPrefixes`` whose stack
        of cartridges may be reused."""
        import torch

        device = self.engine.model.device
        old = self.rows
        rows = old + fresh
        width = max(r.length for r in rows)
        capacity = width + max(r.request.max_new_tokens - len(r.out.token_ids) for r in rows)
        old_width = self.mask.shape[1] if old else 0
        old_len = max((r.length for r in old), default=0)
        ref = kvs[0][0][0][0]
        keys, values = [], []
        for layer in range(len(kvs[0])):
            k = ref.new_zeros((len(rows), ref.shape[1], capacity, ref.shape[3]))
            v = torch.zeros_like(k)
            if old:  # the old rows' live columns move right-aligned as one block
                src = self.cache.layers[layer]
                k[:len(old), :, width - old_len:width] = src.keys[:, :, old_width - old_len:old_width]
                v[:len(old), :, width - old_len:width] = src.values[:, :, old_width - old_len:old_width]
            for i, row in enumerate(fresh):
                col = width - row.length
                for fk, fv in kvs[i][layer]:
                    k[len(old) + i, :, col:col + fk.shape[2]] = fk[0]
                    v[len(old) + i, :, col:col + fk.shape[2]] = fv[0]
                    col += fk.shape[2]
            keys.append(k)
            values.append(v)
        self.cache = None  # the old buffers go before the next are in use
        self.cache = preallocated_cache(self.engine.model, keys, values, width)
        self.mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            self.mask[i, width - row.length:] = 1
        self.logits = logits if not old else torch.cat([self.logits, logits])
        self.rows = rows
        self._regroup(stacked)

    def _regroup(self, previous) -> None:
        """Group rows by KV prefix object: each group reads its prefix once per layer. Called
        only when rows join or leave, so the ``SharedPrefixes`` (and the stack of several
        cartridges built on it) serves every decode step in between; the previous one is
        handed over (``previous``) so that rows leaving keep its stack instead of copying the
        cartridges again."""
        import torch

        self._groups = self.engine.shared_prefixes([r.request.kv_prefix for r in self.rows],
                                                   previous=previous)

        self.positions = torch.tensor([[r.position] for r in self.rows], device=self.engine.model.device)

    def drop(self, rows: list[BatchRow]) -> None:
        """Take rows out (cancelled requests) before the next step."""
        gone = {id(r) for r in rows}
        self._keep([i for i, r in enumerate(self.rows) if id(r) not in gone])

    def _keep(self, keep: list[int]) -> None:
        import torch

        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            self.positions = self.logits = self._groups = None
            return
        index = torch.tensor(keep, device=self.engine.model.device)
        for layer in self.cache.layers:
            layer.keep_rows(index)
        self.mask, self.logits = self.mask[index], self.logits[index]
        self.rows = [self.rows[i] for i in keep]
        self._regroup(self._groups)

    def kv_bytes(self) -> int:
        """Bytes of KV the batch holds: the row buffers, plus each shared prefix once, plus the
        padded stack of its prefixes built so far when it mixes several (one more copy of them,
        see ``cart.attention``)."""
        if not self.rows:
            return 0
        own = kv_nbytes([(layer._k, layer._v) for layer in self.cache.layers])
        shared = {id(r.request.kv_prefix): r.request.kv_prefix for r in self.rows if r.request.kv_prefix}
        stacked = self._groups.stacked_nbytes() if self._groups is not None else 0
        return own + stacked + sum(kv_nbytes(self.engine.prefix_layers(p)) for p in shared.values())

    def step(self) -> list[StepEvent]:
        """One token for every row; then one forward pass for the rows that go on."""
        import torch

        if not self.rows:
            return []
        logits = self.logits
        chosen = logits.argmax(dim=-1).tolist()
        k = max(r.request.top_k_logprobs for r in self.rows)
        if k:
            top_lp, top_ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            top_lp, top_ids = top_lp.cpu().tolist(), top_ids.cpu().tolist()
        events, keep = [], []
        eos = self.engine.eos_token_ids
        for i, (row, finite) in enumerate(zip(self.rows, finite_rows(logits))):
            r, out = row.request, row.out
            if not finite:  # NaN from a cartridge or the model: this row fails, the rest go on
                events.append(StepEvent(row, -1, True, None, NON_FINITE))
                continue
            if r.temperature > 0:  # each request draws from its own generator
                chosen[i] = sample_token(logits[i], r.temperature, row.generator)
            token = chosen[i]
            out.token_ids.append(token)
            if r.top_k_logprobs:
                out.topk.append(TopK(top_ids[i][:r.top_k_logprobs], top_lp[i][:r.top_k_logprobs]))
            reason = None
            if token in eos and not r.ignore_eos:
                out.finished, reason = True, "eos"
            elif len(out.token_ids) >= r.max_new_tokens:
                reason = "length"
            elif r.stop_loops and (cut := loop_start(out.token_ids)) is not None:
                del out.token_ids[cut:], out.topk[cut:]
                out.looped, reason = True, "loop"
            else:
                keep.append(i)
            events.append(StepEvent(row, token, reason is not None, reason))
        # Drop finished rows so the rest decode at the batch size they need: rows are
        # independent (each attends only to its own cache and prefix), so results do not change.
        self._keep(keep)
        if self.rows:
            device = self.engine.model.device
            next_ids = torch.tensor([[r.out.token_ids[-1]] for r in self.rows], device=device)
            self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype,
                                                         device=device)], dim=1)
            with torch.inference_mode():
                self.logits = self.engine.model(
                    input_ids=next_ids, attention_mask=self.mask, position_ids=self.positions,
                    past_key_values=self.cache, use_cache=True,
                    cart_prefixes=self._groups).logits[:, -1].float()
            for row in self.rows:
                row.length += 1
                row.position += 1
            self.positions = self.positions + 1
        return events


def _prefill_mask(starts: list[int], news: list[int], device):
    """The mask of a ``prefill_rows`` pass, ``[B, 1, T, P + T]`` bool (True: attend), or None
    when no row is padded (the model's causal mask is then exact). Query t of row i reads the
    columns up to its own that are the row's: its stored prefix ``[P - s_i, P)`` and its
    tokens ``[P + T - n_i, P + T)``. A padding query also reads itself: with nothing to read
    (no stored prefix, no cartridge) its softmax would be NaN, and a NaN key/value in the next
    layer reaches the row's real queries as 0 * NaN even though it is masked for them."""
    import torch

    P, T = max(starts), max(news)
    if all(s == P for s in starts) and all(n == T for n in news):
        return None
    col = torch.arange(P + T)
    query = P + torch.arange(T).unsqueeze(1)  # [T, 1]: the column of each query
    own = torch.stack([(col >= P - s) & ((col < P) | (col >= P + T - n)) for s, n in zip(starts, news)])
    allowed = (own[:, None, :] & (col <= query)) | (col == query)  # [B, T, P + T]
    return allowed.unsqueeze(1).to(device)


def preallocated_cache(model: Any, key_buffers: list[Any], value_buffers: list[Any], length: int):
    """A DynamicCache over per-layer buffers ``[B, kv_heads, capacity, d]`` whose first
    ``length`` positions are filled: decoding writes in place instead of re-concatenating the
    whole cache at every step (a full copy of it per token)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(k, v, length) for k, v in zip(key_buffers, value_buffers)]
    return cache


class PreallocatedLayer(DynamicLayer):
    """One layer of a ``preallocated_cache``: keys and values written into its buffers."""

    def __init__(self, key_buffer, value_buffer, length: int):
        super().__init__()
        self._k, self._v, self._n = key_buffer, value_buffer, length
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.is_initialized = True
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self._n + key_states.shape[-2]
        if end > self._k.shape[2]:  # out of room: double (amortised), like a vector
            pad = (0, 0, 0, max(end, 2 * self._k.shape[2]) - self._k.shape[2])
            self._k, self._v = F.pad(self._k, pad), F.pad(self._v, pad)
        self._k[:, :, self._n:end] = key_states
        self._v[:, :, self._n:end] = value_states
        self._n = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def keep_rows(self, rows):
        """Drop the batch rows not in ``rows`` (finished generations)."""
        self._k, self._v = self._k.index_select(0, rows), self._v.index_select(0, rows)
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]
