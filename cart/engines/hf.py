"""The transformers engine: batched generation with left padding and a KV cache, written as a
plain decode loop so the teacher's top-k log-probs come from the raw logits (before temperature)
at no extra forward pass."""

from __future__ import annotations

from typing import Any

from cart.engines.base import (Engine, Generation, GenerationRequest, KVPrefix, ScoreRequest, TopK,
                               loop_start)
from cart.models import context_length


class TransformersEngine(Engine):
    def __init__(self, model: Any, tokenizer: Any, identity: Any,
                 prefix_cache_bytes: int = 4 << 30):
        self.model = model
        # KV of shared prompt prefixes (a chunk's system prompt, used by A and then by B),
        # least recently used first; bounded in bytes.
        self._prefixes: dict[tuple, list[tuple[Any, Any]]] = {}
        self._prefix_cache_bytes = prefix_cache_bytes
        self.tokenizer = tokenizer
        self.identity = identity
        self.model_id = identity.model_id
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = eos_ids
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        self.max_context = context_length(model.config)

    @classmethod
    def load(cls, model: str | None, dtype: str = "float32", device: str = "cpu", console=None):
        from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

        ref = resolve_model(model, console)
        tokenizer = load_tokenizer(ref)
        hf_model = load_model(ref, dtype=dtype, device=device)
        from cart.attention import register

        hf_model.set_attn_implementation(register())
        return cls(hf_model, tokenizer, ModelIdentity.of(ref, hf_model.config, tokenizer))

    def generate(self, requests: list[GenerationRequest], seed: int) -> list[Generation]:
        import torch

        if not requests:
            return []
        temps = {r.temperature for r in requests}
        ks = {r.top_k_logprobs for r in requests}
        if len(temps) != 1 or len(ks) != 1:
            raise ValueError("one batch must share temperature and top_k_logprobs")
        temperature, k = temps.pop(), ks.pop()
        device = self.model.device
        b = len(requests)
        limits = [r.max_new_tokens for r in requests]
        generators = [torch.Generator(device="cpu").manual_seed(
            r.seed if r.seed is not None else seed * 1_000_003 + i) for i, r in enumerate(requests)]
        outputs = [Generation([], False) for _ in requests]
        with torch.inference_mode():
            cache, mask, logits = self._prefill(requests)
            shifts = torch.tensor([[r.kv_prefix.shift if r.kv_prefix else 0] for r in requests],
                                  device=device)
            positions = mask.sum(-1, keepdim=True) - 1 - shifts
            rows = list(range(b))  # batch row -> request index (rows shrink as requests finish)
            for step in range(max(limits)):
                logprobs = torch.log_softmax(logits, dim=-1)
                if temperature > 0:  # each request draws from its own generator
                    probs = torch.softmax(logits / temperature, dim=-1).cpu()
                    next_ids = torch.cat([torch.multinomial(probs[row], 1, generator=generators[i])
                                          for row, i in enumerate(rows)]).to(device)
                else:
                    next_ids = logits.argmax(dim=-1)
                if k:
                    top_lp, top_ids = logprobs.topk(k, dim=-1)
                    top_lp, top_ids = top_lp.cpu().tolist(), top_ids.cpu().tolist()
                next_list = next_ids.cpu().tolist()
                still = []
                for row, i in enumerate(rows):
                    out = outputs[i]
                    out.token_ids.append(next_list[row])
                    if k:
                        out.topk.append(TopK(top_ids[row], top_lp[row]))
                    if next_list[row] in self.eos_token_ids:
                        out.finished = True
                    elif len(out.token_ids) >= limits[i]:
                        pass
                    elif requests[i].stop_loops and (cut := loop_start(out.token_ids)) is not None:
                        del out.token_ids[cut:], out.topk[cut:]
                        out.looped = True
                    else:
                        still.append(row)
                if not still:
                    break
                if len(still) < len(rows):
                    # Drop finished rows so the rest decode at the batch size they need: a
                    # long tail no longer pays for the whole batch. Rows are independent
                    # (each attends only to its own cache), so results do not change.
                    keep = torch.tensor(still, device=device)
                    for layer in cache.layers:
                        layer.keep_rows(keep)
                    mask, positions, next_ids = mask[keep], positions[keep], next_ids[keep]
                    rows = [rows[r] for r in still]
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
                positions = positions + 1
                logits = self.model(input_ids=next_ids.view(-1, 1), attention_mask=mask,
                                    position_ids=positions, past_key_values=cache,
                                    use_cache=True).logits[:, -1].float()
        return outputs

    def _row_cache(self, prompt_ids: list[int], prefix_len: int, kv_prefix: KVPrefix | None):
        """A fresh cache holding the request's KV prefix (a cartridge) and, when the prompt has
        a shared prefix, that prefix's stored KV; returns (cache, first prompt index to run)."""
        from transformers import DynamicCache

        row = DynamicCache(config=self.model.config)
        start = 0
        if 0 < prefix_len < len(prompt_ids):
            for layer, (k, v) in enumerate(self._prefix_kv(prompt_ids[:prefix_len], kv_prefix)):
                row.update(k.clone(), v.clone(), layer)
            start = prefix_len
        elif kv_prefix is not None:
            for layer, (k, v) in enumerate(self._kv_prefix_tensors(kv_prefix)):
                row.update(k.clone(), v.clone(), layer)
        return row, start

    def _positions(self, kv_prefix: KVPrefix | None, start: int, end: int):
        """Position ids of prompt tokens ``start..end-1`` (after the KV prefix, if any)."""
        import torch

        first = 0 if kv_prefix is None else kv_prefix.first_position
        return torch.arange(first + start, first + end, device=self.model.device).unsqueeze(0)

    def _kv_prefix_tensors(self, kv_prefix: KVPrefix) -> list[tuple[Any, Any]]:
        dtype, device = self.model.dtype, self.model.device
        return [(k.to(device=device, dtype=dtype).unsqueeze(0), v.to(device=device, dtype=dtype).unsqueeze(0))
                for k, v in kv_prefix.kv]

    def _prefill(self, requests: list[GenerationRequest]):
        """Prefill each prompt alone -- no padding, so no mask and SDPA's fused causal kernel,
        starting from its KV prefix (cartridge) and the stored KV of its shared prompt prefix
        when there are -- then lay the caches out left-padded for batched decoding. A row's
        length counts its KV prefix, so the mask covers it and positions continue after it.
        Returns (cache, mask, last-position logits)."""
        import torch

        from cart.kvcache import preallocated_cache

        device = self.model.device
        lengths = [len(r.prompt_ids) + (r.kv_prefix.tokens if r.kv_prefix else 0) for r in requests]
        width = max(lengths)
        rows, last = [], []
        for r in requests:
            row, start = self._row_cache(r.prompt_ids, r.prefix_len, r.kv_prefix)
            out = self.model(input_ids=torch.tensor([r.prompt_ids[start:]], device=device),
                             position_ids=self._positions(r.kv_prefix, start, len(r.prompt_ids)),
                             past_key_values=row, use_cache=True, logits_to_keep=1)
            last.append(out.logits[0, -1].float())
            rows.append(row)
        # room for every token the batch may generate: decoding never reallocates
        capacity = width + max(r.max_new_tokens for r in requests)
        key_buffers, value_buffers = [], []
        for layer in range(len(rows[0].layers)):
            k0 = rows[0].layers[layer].keys
            keys = k0.new_zeros((len(requests), k0.shape[1], capacity, k0.shape[3]))
            values = torch.zeros_like(keys)
            for i, row in enumerate(rows):
                n = lengths[i]
                keys[i, :, width - n:width] = row.layers[layer].keys[0]
                values[i, :, width - n:width] = row.layers[layer].values[0]
                row.layers[layer].keys = row.layers[layer].values = None  # free as we go
            key_buffers.append(keys)
            value_buffers.append(values)
        cache = preallocated_cache(self.model, key_buffers, value_buffers, width)
        mask = torch.zeros((len(requests), width), dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            mask[i, width - n:] = 1
        return cache, mask, torch.stack(last)

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        import torch

        out = []
        with torch.inference_mode():
            for r in requests:
                if not 0 < r.target_start < len(r.prompt_ids):
                    raise ValueError(f"target_start {r.target_start} outside 1..{len(r.prompt_ids) - 1}")
                prefix_len = min(r.prefix_len, r.target_start - 1)
                row, start = self._row_cache(r.prompt_ids, prefix_len, r.kv_prefix)
                ids = r.prompt_ids[start:]
                logits = self.model(input_ids=torch.tensor([ids], device=self.model.device),
                                    position_ids=self._positions(r.kv_prefix, start, len(r.prompt_ids)),
                                    past_key_values=row, use_cache=True).logits[0].float()
                first = r.target_start - start  # index in ids of the first target
                logp = torch.log_softmax(logits[first - 1:-1], dim=-1)
                gold = torch.tensor(ids[first:], device=logp.device).unsqueeze(1)
                out.append(logp.gather(1, gold).squeeze(1).cpu().tolist())
        return out

    def _prefix_kv(self, prefix: list[int], kv_prefix: KVPrefix | None = None) -> list[tuple[Any, Any]]:
        """KV of a shared prompt prefix (after ``kv_prefix``, included), LRU-cached in bytes."""
        import torch

        from cart.kvcache import prefix_kv

        key = (kv_prefix.key if kv_prefix else None, tuple(prefix))
        kv = self._prefixes.pop(key, None)
        if kv is None:
            ids = torch.tensor(prefix, device=self.model.device)
            if kv_prefix is None:
                kv = [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in prefix_kv(self.model, ids)]
            else:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                for layer, (k, v) in enumerate(self._kv_prefix_tensors(kv_prefix)):
                    cache.update(k, v, layer)
                with torch.inference_mode():
                    self.model(input_ids=ids.view(1, -1), past_key_values=cache, use_cache=True,
                               position_ids=self._positions(kv_prefix, 0, len(prefix)),
                               logits_to_keep=1)
                kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefixes[key] = kv  # most recently used last
        per_entry = lambda e: sum(k.numel() * k.element_size() * 2 for k, _ in e)  # noqa: E731
        while len(self._prefixes) > 1 and sum(map(per_entry, self._prefixes.values())) > self._prefix_cache_bytes:
            self._prefixes.pop(next(iter(self._prefixes)))
        return kv

    def forward_logprobs(self, input_ids: list[int]):
        """Log-probs of the next token at every position of one unpadded sequence
        (``[T, vocab]``): the reference the stored teacher targets are checked against."""
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([input_ids], device=self.model.device)).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)
