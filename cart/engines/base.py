"""The engine interface: batched generation from token ids, with optional top-k log-probs of
the model's own (unprocessed) next-token distribution at every generated position."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TopK:
    """Top candidates of one next-token distribution: ids and natural-log probabilities."""

    ids: list[int]
    logprobs: list[float]


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, including the EOS that ended it (if any)
    finished: bool  # stopped at EOS (False: hit max_new_tokens)
    topk: list[TopK] = field(default_factory=list)  # one per generated token, if requested


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k_logprobs: int = 0  # 0: none
    # The first prefix_len prompt tokens are a prefix other requests share (a chunk's system
    # prompt): engines may compute its KV once and reuse it.
    prefix_len: int = 0


class Engine:
    """What the self-study algorithm needs from a model runtime."""

    model_id: str
    tokenizer: Any
    identity: Any  # cart.models.ModelIdentity
    eos_token_ids: set[int]
    max_context: int

    def generate(self, requests: list[GenerationRequest], seed: int) -> list[Generation]:
        """Run a batch. Same requests + same seed = same output (the batch is the unit of
        determinism: keep batch composition fixed to reproduce a run)."""
        raise NotImplementedError
