"""The engine contracts (``Engine``, ``RunningBatch``): batched generation from token ids, with
optional top-k log-probs of the model's own (unprocessed) next-token distribution at every
generated position; teacher-forced scoring of given continuations; and a running batch that
requests join and leave between decode steps (``cart serve``'s continuous batching). Each can
start from a KV prefix (a cartridge): the prompt then begins at ``KVPrefix.query_position``.
``cart.engines.hf`` and ``cart.engines.vllm`` implement them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class TopK:
    """Top candidates of one next-token distribution: ids and natural-log probabilities."""

    ids: list[int]
    logprobs: list[float]


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, including the EOS that ended it (if any)
    finished: bool  # stopped at EOS (False: hit max_new_tokens, or cut in a loop)
    looped: bool = False  # cut because it repeated itself
    topk: list[TopK] = field(default_factory=list)  # one per generated token, if requested


@dataclass(eq=False)
class KVPrefix:
    """KV every token of a request attends to before its prompt: per layer ``[kv_heads, n,
    head_dim]`` keys (post-RoPE at positions 0..n-1) and values -- a cartridge, composed or
    not; a flat (ragged) cartridge's are ``[1, n, head_dim]``, shared by the KV heads, with
    ``[kv_heads, n]`` biases that keep each head to its own columns (``num_tokens`` is then its
    average per head). ``key`` names its content (engines may cache per prefix under it)."""

    key: str
    kv: list[tuple[Any, Any]]
    num_tokens: int
    # Position of the first token after the prefix (None: ``num_tokens``). A composed
    # cartridge's parts were each trained with queries at their own p, so its queries sit
    # there, not at the sum of the parts (cart.cartridge.Cartridge.query_position).
    query_position: int | None = None
    # per layer [kv_heads, n] additive attention-logit biases (compacted cartridges), or None
    bias: list[Any] | None = None

    def __post_init__(self):
        if self.query_position is None:
            self.query_position = self.num_tokens

    @classmethod
    def of_cartridge(cls, cart: Any, key: str) -> KVPrefix:
        """A cartridge (``cart.cartridge.Cartridge``, composed or not) as a KV prefix named
        ``key`` (its content hash), queries at its ``query_position``."""
        return cls(key, [cart.layer(i) for i in range(cart.num_layers)], cart.num_tokens,
                   cart.query_position, cart.biases)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k_logprobs: int = 0  # 0: none
    # The first prefix_len prompt tokens are a prefix other requests share (a chunk's system
    # prompt): engines may compute its KV once and reuse it.
    prefix_len: int = 0
    # Stop a generation that has fallen into a loop (its last block of tokens repeated
    # LOOP_REPEATS times); the repeats are dropped. Small models loop until the token cap.
    stop_loops: bool = False
    # Sampling seed of this request alone (its draws do not depend on the rest of the batch);
    # None: derived from the batch seed and the request's position.
    seed: int | None = None
    kv_prefix: KVPrefix | None = None  # e.g. a cartridge; prompt positions start after it
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks)


@dataclass
class ScoreRequest:
    """Teacher-forced: the log-probability of ``prompt_ids[target_start:]`` given what precedes
    each of them (and the KV prefix). ``prefix_len`` as in GenerationRequest."""

    prompt_ids: list[int]
    target_start: int
    prefix_len: int = 0
    kv_prefix: KVPrefix | None = None


LOOP_REPEATS = 3
LOOP_MIN_TOKENS = 12  # a loop must span at least this many tokens (so "a a a" is not one)
LOOP_MAX_PERIOD = 48


def loop_start(tokens: list[int]) -> int | None:
    """If ``tokens`` ends in a block repeated LOOP_REPEATS times, the index where the repeats
    after the first copy begin (the generation is cut there); else None."""
    n = len(tokens)
    for period in range(1, LOOP_MAX_PERIOD + 1):
        span = period * LOOP_REPEATS
        if span > n:
            break
        if span < LOOP_MIN_TOKENS:
            continue
        block = tokens[n - period:]
        if all(tokens[n - (r + 1) * period:n - r * period] == block for r in range(1, LOOP_REPEATS)):
            return n - span + period
    return None


@dataclass
class StepEvent:
    """One token of a running batch (``cart serve``'s scheduler reads these from any engine)."""

    row: Any  # the engine's row for the request
    token_id: int
    done: bool
    reason: str | None  # when done: "eos", "length" or "loop"
    error: str | None = None  # this row failed (and is done); the rest of the batch goes on


NON_FINITE = ("the model's next-token scores are not finite (NaN or infinite): the cartridge or "
              "the model holds NaN or infinite values")


def finite_rows(logits: Any) -> list[bool]:
    """Per row of ``[rows, vocab]`` next-token scores: whether it can be sampled from (no NaN,
    a finite maximum). A row that cannot fails alone (``NON_FINITE``), not its batch."""
    import torch

    return (~torch.isnan(logits).any(dim=-1) & torch.isfinite(logits.max(dim=-1).values)).tolist()


def sample_token(logits: Any, temperature: float, generator: Any) -> int:
    """One token from one row's next-token ``logits`` (a ``finite_rows`` row) at
    ``temperature`` > 0, drawn with ``generator``.

    ``softmax(logits/T)`` is computed as ``softmax((logits - max)/T)`` with the maximum's
    entries pinned to 0: a tiny T (1e-40, or 5e-324, which is 0 in float32) then gives -inf to
    every other token -- the greedy choice, ties drawn evenly -- instead of inf/inf = NaN."""
    import torch

    shifted = logits - logits.max()
    scaled = torch.where(shifted == 0, torch.zeros_like(shifted), shifted / temperature)
    probs = torch.softmax(scaled, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_token_ids(eos: int | list[int] | None, tokenizer: Any) -> set[int]:
    """The ids that end a generation: a config's ``eos_token_id`` (one or a list) and the
    tokenizer's EOS."""
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class RunningBatch(Protocol):
    """A continuous batch (``Engine.open_batch``): requests join it and leave it between decode
    steps. ``cart serve``'s scheduler drives one from a single thread (no call overlaps)."""

    def add(self, requests: list[GenerationRequest], seeds: list[int]) -> list[Any]:
        """Prefill ``requests`` (request i samples from ``seeds[i]`` alone) and return one row
        per request, in order: an opaque handle, compared by identity, that ``StepEvent.row``
        and ``drop`` name it by. If it raises, the batch is as it was."""

    def drop(self, rows: list[Any]) -> None:
        """Take rows out before the next step (cancelled requests)."""

    def step(self) -> list[StepEvent]:
        """Decode: the rows' new tokens in order (a row may give several); a ``done`` event is
        a row's last, and it has left the batch then. If it raises, the batch's state is
        unknown: open a new one."""

    def kv_bytes(self) -> int:
        """Bytes of KV the rows hold now (a shared KV prefix counted as the engine holds it)."""


class Engine(Protocol):
    """What self-study, eval and serve need from a model runtime (``cart.engines.get_engine``)."""

    tokenizer: Any
    identity: Any  # cart.models.ModelIdentity (its model_id names the model)
    eos_token_ids: set[int]
    max_context: int  # the model's context length, in tokens

    def generate(self, requests: list[GenerationRequest], seed: int) -> list[Generation]:
        """Run a batch. Same requests + same seed = same output (the batch is the unit of
        determinism: keep batch composition fixed to reproduce a run)."""

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Per request, the natural-log probability of each target token."""

    def open_batch(self) -> RunningBatch:
        """An empty running batch."""
