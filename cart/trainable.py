"""The trainable cartridge of ``cart distill``: its keys and values as ``nn.Parameter`` behind
the frozen model. A module of its own so that ``cart.distill`` (and ``cart distill --help``)
imports torch only when training starts."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from cart.distill import Batch

# The loss runs over the targets in chunks of at most this many bytes of float32 logits
# (targets x vocabulary x 4): all of a 4 x 2048-token batch's at once, with a 128k vocabulary,
# would be 4 GB (and as much again for the log-softmax kept for the backward).
LOSS_CHUNK_BYTES = 512 << 20


class TrainableCartridge(nn.Module):
    """The cartridge's trainable keys/values as parameters; the sink and the model are
    held outside the module's parameters (frozen, never handed to the optimizer)."""

    def __init__(self, cart, model, objective: str, dtype: str):
        super().__init__()
        self.keys = nn.ParameterList([nn.Parameter(k.detach().float().clone()) for k in cart.keys])
        self.values = nn.ParameterList([nn.Parameter(v.detach().float().clone()) for v in cart.values])
        # plain attributes: not parameters or buffers, so DDP neither syncs nor trains them
        object.__setattr__(self, "frozen_keys", [k.detach().float().clone() for k in cart.frozen_keys])
        object.__setattr__(self, "frozen_values", [v.detach().float().clone() for v in cart.frozen_values])
        # attention biases (compacted cartridges) stay as they were fitted
        object.__setattr__(self, "biases", None if cart.biases is None else
                           [b.detach().float().clone() for b in cart.biases])
        object.__setattr__(self, "model", model)
        from cart.attention import register

        model.set_attn_implementation(register())  # the cartridge is cart_gqa's shared prefix
        self.objective = objective
        # "flex" or "dense" forces an attention path; None: training_attention(the batch's device).
        # A flat cartridge's layers differ in length, and one BlockMask serves every layer: dense
        self.attention: str | None = "dense" if cart.flat else None
        self.compute_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.loss_chunk = max(1, LOSS_CHUNK_BYTES // (4 * int(model.config.vocab_size)))  # targets
        if self.compute_dtype == torch.bfloat16 and next(model.parameters()).device.type == "cuda":
            # frozen weights held in bfloat16 on GPUs: half the memory and no float32 -> bfloat16
            # cast of every weight in every forward. Parameters only: RoPE's inv_freq buffer stays
            # float32, as from_pretrained(dtype=bfloat16) keeps it (bfloat16 angles drift)
            for p in model.parameters():  # (tied embeddings: one parameter, cast once)
                p.data = p.data.to(torch.bfloat16)

    def place(self, device):
        """This module on ``device``, returned: its parameters and the frozen tensors (sinks,
        biases) kept outside them, which ``Module.to`` does not move."""
        self.to(device)
        object.__setattr__(self, "frozen_keys", [k.to(device) for k in self.frozen_keys])
        object.__setattr__(self, "frozen_values", [v.to(device) for v in self.frozen_values])
        if self.biases is not None:
            object.__setattr__(self, "biases", [b.to(device) for b in self.biases])
        return self

    def autocast(self, device_type: str):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16,
                              enabled=self.compute_dtype == torch.bfloat16)

    def forward(self, batch: Batch, scale: float):
        """(the loss summed over the batch's N targets times ``scale``, to backpropagate; its
        unscaled sum; the KL sum). The sums are detached 0-d float32 tensors on the batch's
        device: reading them is a host sync, left to the caller (once per optimizer step)."""
        from cart.attention import SharedPrefixes, packed_block_mask, packed_mask, training_attention

        if batch.num_targets == 0:  # a process without rows this micro-step: zero gradients
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero, zero.detach(), zero.detach()
        model = self.model
        device = batch.input_ids.device
        b = batch.input_ids.shape[0]
        with self.autocast(device.type):
            kv = [(torch.cat([fk, k], dim=1).to(self.compute_dtype),
                   torch.cat([fv, v], dim=1).to(self.compute_dtype)) for fk, k, fv, v in
                  zip(self.frozen_keys, self.keys, self.frozen_values, self.values)]
            # every row reads the one cartridge (dense: broadcast, never copied per row; flex:
            # concatenated to each row's keys, B x [kv_heads, p, d] per layer)
            prefix = SharedPrefixes([(list(range(b)), kv, self.biases)], b)
            if (self.attention or training_attention(device)) == "flex":
                # one BlockMask for every layer (its creation is a pass over [B, T, p + T])
                mask = packed_block_mask(batch.segment, kv[0][0].shape[-2])
            else:
                mask = batch.mask if batch.mask is not None else packed_mask(batch.segment)
            hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                 attention_mask=mask, cart_prefixes=prefix,
                                 use_cache=False).last_hidden_state  # [B, T, hidden]
        # the LM head only where a target is: full-vocabulary logits everywhere would cost
        # hundreds of MB for nothing
        picked = hidden[batch.target_rows, batch.target_cols]  # [N, hidden]
        # ntp is the same cross-entropy against a one-hot teacher: the token that follows
        if self.objective == "ntp":
            ids = batch.next_ids.unsqueeze(1)  # [N, 1]
            q = torch.ones(ids.shape, device=device)
        else:
            ids, q = batch.cand_ids, batch.cand_probs  # [N, K]
        n, c = batch.num_targets, self.loss_chunk
        # several chunks: each recomputes its logits in the backward rather than keeping them,
        # so the peak is one chunk's (one chunk keeps them: nothing to gain, a recompute to pay)
        chunk_loss = self.chunk_loss if n <= c else partial(checkpoint, self.chunk_loss,
                                                            use_reentrant=False)
        loss_sum = sum(chunk_loss(picked[s:s + c], ids[s:s + c], q[s:s + c]) for s in range(0, n, c))
        entropy = -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum()  # the teacher's
        return loss_sum * scale, loss_sum.detach(), loss_sum.detach() - entropy

    def chunk_loss(self, hidden, ids, q):
        """Cross-entropy sum ``-sum q log p_student(ids)`` of a chunk of n targets: ``hidden``
        [n, hidden], ``ids`` and ``q`` [n, K] -> 0-d float32 (log-softmax over the full
        vocabulary, in float32)."""
        with self.autocast(hidden.device.type):
            logits = self.model.lm_head(hidden)  # [n, vocab]
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(q * logp.gather(1, ids)).sum()

    def cartridge(self, metadata: dict[str, Any]):
        from cart.cartridge import Cartridge

        return Cartridge([k.detach().cpu().clone() for k in self.frozen_keys],
                         [v.detach().cpu().clone() for v in self.frozen_values],
                         [k.detach().cpu().clone() for k in self.keys],
                         [v.detach().cpu().clone() for v in self.values], metadata,
                         None if self.biases is None else [b.cpu().clone() for b in self.biases])
