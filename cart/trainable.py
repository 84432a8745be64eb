"""The trainable cartridge of ``cart distill``: its keys and values as ``nn.Parameter`` behind
the frozen model. A module of its own so that ``cart.distill`` (and ``cart distill --help``)
imports torch only when training starts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from cart.distill import Batch

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
        self.compute_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32

    def move_frozen(self, device):
        object.__setattr__(self, "frozen_keys", [k.to(device) for k in self.frozen_keys])
        object.__setattr__(self, "frozen_values", [v.to(device) for v in self.frozen_values])
        if self.biases is not None:
            object.__setattr__(self, "biases", [b.to(device) for b in self.biases])

    def forward(self, batch: Batch, scale: float):
        """Sum of the per-target losses times ``scale``, and the unscaled sums (loss, kl)."""
        from cart.attention import SharedPrefixes

        model = self.model
        device = batch.input_ids.device
        b = batch.input_ids.shape[0]
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                  enabled=self.compute_dtype == torch.bfloat16)
        with autocast:
            kv = [(torch.cat([fk, k], dim=1).to(self.compute_dtype),
                   torch.cat([fv, v], dim=1).to(self.compute_dtype)) for fk, k, fv, v in
                  zip(self.frozen_keys, self.keys, self.frozen_values, self.values)]
            # every row reads the one cartridge (broadcast, never copied per row)
            prefix = SharedPrefixes([(list(range(b)), kv, self.biases)], b)
            hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                 attention_mask=batch.mask, cart_prefixes=prefix,
                                 use_cache=False).last_hidden_state
            # the LM head only where a target is: full-vocabulary logits everywhere would
            # cost hundreds of MB for nothing
            picked = hidden[batch.target_rows, batch.target_cols]
            logits = model.lm_head(picked)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if batch.num_targets == 0:
            zero = logp.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
            return zero, 0.0, 0.0
        if self.objective == "ntp":
            nll = -logp.gather(1, batch.next_ids.unsqueeze(1)).squeeze(1)
            loss_sum = nll.sum()
            kl_sum = loss_sum.detach()
        else:
            student = logp.gather(1, batch.cand_ids)
            q = batch.cand_probs
            loss_sum = -(q * student).sum()
            entropy = -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum()
            kl_sum = (loss_sum.detach() - entropy)
        return loss_sum * scale, float(loss_sum.detach()), float(kl_sum)

    def cartridge(self, metadata: dict[str, Any]):
        from cart.cartridge import Cartridge

        return Cartridge([k.detach().cpu().clone() for k in self.frozen_keys],
                         [v.detach().cpu().clone() for v in self.frozen_values],
                         [k.detach().cpu().clone() for k in self.keys],
                         [v.detach().cpu().clone() for v in self.values], metadata,
                         None if self.biases is None else [b.cpu().clone() for b in self.biases])
