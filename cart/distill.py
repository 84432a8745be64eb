"""``cart distill``: train a cartridge by context distillation (paper sections 3.2, 4.2,
appendix A.3-A.4).

The cartridge is a prefix KV cache of p tokens per layer (post-RoPE keys at positions
``0..p-1``); conversation tokens follow it at positions ``p, p+1, ...``. The first token's
key/value -- the attention sink -- stays frozen, the model is frozen, and only the other p-1
tokens' keys and values train.

Objective (default ``kl``): at every assistant token the student -- the model with the cartridge
and *without* the chunk -- is pulled toward the teacher's next-token distribution stored by
``cart synth`` (top-k log-probs of the model *with* the chunk in context). The stored candidates
cover the teacher's top-k up to a cumulative probability (``--logprob-mass``, 0.99); the tail
beyond them is dropped and the kept probabilities are renormalised to sum to one, so the loss is
the cross-entropy ``-sum_i q_i log p_student(i)`` over the kept candidates, with the student's
log-probs normalised over the full vocabulary. The logged ``kl`` subtracts the (renormalised)
teacher entropy. ``ntp`` is the next-token-prediction ablation on the same positions.

Batches: conversations are packed into rows of up to ``--seq-len`` tokens; each conversation
keeps its own positions (p, p+1, ...) and a 4D mask lets it see the cartridge and its own
earlier tokens only, never another packed conversation. A step is ``--batch-size`` rows
(global: split over ``--grad-accum`` micro-steps and over the processes of ``torchrun``), and
its loss is the sum over its target tokens divided by their number, whatever the split.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cart.config import MAX_BATCH, check_at_most, check_type
from cart.io import (CartError, Console, dumps, intact_records, output_destination, require,
                     run_fingerprint, sha256_hex)

OBJECTIVES = ("kl", "ntp")
INIT_KINDS = ("attention-match", "corpus", "random-tokens", "random-vectors", "text")
DTYPES = ("auto", "float32", "bfloat16")


# Far above any rate that trains (the paper's 0.02; 0.2 on the tiny test models): beyond it
# Adam's state overflows float32 and training dies in NaN.
MAX_LR = 100.0
# --lr's default from a fitted start (attention-match, a cartridge file), which a higher rate
# trains away from: on examples/orbital (p=128, the same 96 default conversations, from the
# global compaction) one epoch at 0.01 closed 91% of the answer-NLL gap and answered 7/39, at
# 0.02 95% and 5/39; two epochs at 0.05 68% and 3/39.
FITTED_START_LR = 1e-2
# ... and from any other start: at a cold start's few dozen CPU steps 0.05 closed more of the
# gap than the reference implementation's 0.02 (real corpus 63% vs 56%; 0.1: 45%).
COLD_START_LR = 5e-2


@dataclass
class DistillConfig:
    tokens: int = 512  # p, the cartridge's length in KV positions (sink included)
    # attention-match | corpus | random-tokens | random-vectors | text | a cartridge file
    init: str = "attention-match"
    init_text: str | None = None  # the file read by --init text
    objective: str = "kl"
    lr: float | None = None  # constant, Adam; None: FITTED_START_LR or COLD_START_LR
    # the CPU-scale recipe (README, "The default recipe"); the paper's GPU scale is
    # --epochs 1 --batch-size 4 --seq-len 2048 on many more conversations
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    batch_size: int = 1  # packed rows per optimizer step (global)
    seq_len: int = 1024  # tokens per packed row
    grad_accum: int = 1
    seed: int = 0
    dtype: str = "auto"  # compute: bfloat16 autocast where the hardware has it, else float32
    device: str = "auto"
    save_every: int = 50  # checkpoint every N steps (and at the end)
    frozen_tokens: int = 1

    def __post_init__(self):
        for name in ("tokens", "epochs", "batch_size", "seq_len", "grad_accum", "seed",
                     "save_every", "frozen_tokens"):
            check_type(name, getattr(self, name), int)
        if self.lr is None:
            fitted = self.init == "attention-match" or init_is_cartridge(self.init)
            self.lr = FITTED_START_LR if fitted else COLD_START_LR
        check_type("lr", self.lr, (int, float))
        if self.steps is not None:
            check_type("steps", self.steps, int)
            if self.steps < 1:
                raise CartError(f"--steps must be at least 1, got {self.steps}")
        for name, flag_name, low in (("tokens", "-p/--tokens", 2), ("epochs", "--epochs", 1),
                                     ("batch_size", "--batch-size", 1), ("seq_len", "--seq-len", 1),
                                     ("grad_accum", "--grad-accum", 1),
                                     ("save_every", "--save-every", 1),
                                     ("frozen_tokens", "--frozen-tokens", 1)):
            if getattr(self, name) < low:
                raise CartError(f"{flag_name} must be at least {low}, got {getattr(self, name)}")
        check_at_most("--batch-size", self.batch_size, MAX_BATCH)
        if self.frozen_tokens >= self.tokens:
            raise CartError(f"--frozen-tokens ({self.frozen_tokens}) must be less than "
                            f"-p/--tokens ({self.tokens})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CartError(f"--lr must be a positive number, got {self.lr}")
        check_at_most("--lr", self.lr, MAX_LR)
        if self.objective not in OBJECTIVES:
            raise CartError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.dtype not in DTYPES:
            raise CartError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.init not in INIT_KINDS and not init_is_cartridge(self.init):
            raise CartError(f"--init must be attention-match, corpus, random-tokens, random-vectors, "
                            f"text, a .safetensors cartridge file or a PEFT cartridge adapter "
                            f"folder, got {self.init!r}")
        if self.init == "attention-match" and self.frozen_tokens != 1:
            raise CartError("--init attention-match keeps one frozen token (the sink): give "
                            "--frozen-tokens 1")
        if (self.init == "text") != (self.init_text is not None):
            raise CartError("--init text needs --init-text FILE (and --init-text needs --init text)")
        if self.batch_size % self.grad_accum:
            raise CartError(f"--batch-size ({self.batch_size}) must be a multiple of --grad-accum "
                            f"({self.grad_accum})")


def init_is_cartridge(init: str) -> bool:
    """Whether ``--init`` names a cartridge to continue from: a file or a PEFT adapter folder."""
    from cart.peft_adapter import is_adapter_dir

    return init.endswith(".safetensors") or is_adapter_dir(init)


# -- conversations -------------------------------------------------------------------------------
@dataclass
class Conversation:
    id: str
    token_ids: list[int]
    positions: list[int]  # index (in token_ids) of each predicted token
    cand_ids: list[list[int]]  # teacher candidates per position, best first
    cand_logprobs: list[list[float]]
    where: str = ""  # FILE:LINE of its record, for messages


@dataclass
class ConvoSet:
    convos: list[Conversation]
    model: dict[str, Any]  # id, config_hash, tokenizer_hash
    corpus: dict[str, Any] | None
    corpus_paths: list[str]
    head_ids: list[int] | None
    head_source: str | None
    synth: dict[str, Any]  # runs and the synth config of the first run
    digest: str  # hash of the training data (ids and targets)
    sources: list[str] = field(default_factory=list)


def load_conversations(inputs: Sequence[str]) -> ConvoSet:
    """Read and check cart.convo/1 records (files or ``-``); one model, one teacher."""
    import hashlib

    from cart.io import read_jsonl

    convos: list[Conversation] = []
    model = corpus = None
    model_where = ""
    head_ids, head_source = None, None
    runs: dict[str, dict[str, Any]] = {}
    paths: dict[str, None] = {}
    digest = hashlib.sha256()
    for source in inputs:
        for line in read_jsonl(source, kind="convo"):
            r, where = line.record, line.where
            convo = _parse_convo(r, where)
            m = require(r, "model", dict, where)
            ident = {k: m.get(k) for k in ("id", "config_hash", "tokenizer_hash")}
            if model is None:
                model, model_where = ident, where
            elif (ident["config_hash"], ident["tokenizer_hash"]) != (model["config_hash"],
                                                                    model["tokenizer_hash"]):
                raise CartError(f"{where}: conversation from model {ident['id']} (config "
                                f"{ident['config_hash']}, tokenizer {ident['tokenizer_hash']}), but "
                                f"{model_where} is from {model['id']} (config {model['config_hash']}, "
                                f"tokenizer {model['tokenizer_hash']}): distill one model's data")
            if corpus is None and isinstance(r.get("corpus"), dict):
                corpus = r["corpus"]
                # they go into the cartridge's metadata, which must read back
                for key, types in (("hash", str), ("n_tokens", int)):
                    if corpus.get(key) is not None:
                        require(corpus, key, types, f"{where}: corpus")
            head = r.get("corpus_head")
            if head_ids is None and isinstance(head, dict) and isinstance(head.get("ids"), list):
                if not all(_is_token_id(t) for t in head["ids"]):
                    raise CartError(f"{where}: field 'corpus_head.ids' must be a list of token ids")
                head_ids, head_source = head["ids"], f"{head.get('source', 'corpus')} ({where})"
            run = r.get("run")
            if isinstance(run, str) and run not in runs:
                runs[run] = r.get("config") if isinstance(r.get("config"), dict) else {}
            chunk = r.get("chunk")
            if isinstance(chunk, dict):
                for p in chunk.get("paths") or []:
                    if isinstance(p, str):
                        paths[p] = None
            digest.update(dumps([convo.token_ids, convo.positions, convo.cand_ids,
                                 convo.cand_logprobs]))
            convos.append(convo)
    if not convos:
        raise CartError(f"{', '.join(map(str, inputs))}: no conversations (expected cart.convo/1 "
                        "records from cart synth)")
    first_config = next(iter(runs.values()), {})
    synth = {"runs": sorted(runs), "num_convos": len(convos), "config": first_config}
    return ConvoSet(convos, model, corpus, sorted(paths), head_ids, head_source, synth,
                    digest.hexdigest()[:16], list(map(str, inputs)))


def _parse_convo(r: dict, where: str) -> Conversation:
    ids = require(r, "token_ids", list, where)
    if not ids:
        raise CartError(f"{where}: field 'token_ids' is empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise CartError(f"{where}: field 'token_ids' must hold non-negative integers")
    targets = require(r, "targets", dict, where)
    positions = require(targets, "positions", list, where + ": targets")
    cand_ids = require(targets, "ids", list, where + ": targets")
    cand_lps = require(targets, "logprobs", list, where + ": targets")
    if not (len(positions) == len(cand_ids) == len(cand_lps)):
        raise CartError(f"{where}: targets.positions, targets.ids and targets.logprobs differ "
                        f"in length ({len(positions)}, {len(cand_ids)}, {len(cand_lps)})")
    for j, pos in enumerate(positions):
        if not isinstance(pos, int) or isinstance(pos, bool) or not 0 < pos < len(ids):
            raise CartError(f"{where}: targets.positions[{j}] = {pos!r} is outside 1..{len(ids) - 1}")
        c, lp = cand_ids[j], cand_lps[j]
        if not (isinstance(c, list) and isinstance(lp, list) and c and len(c) == len(lp)):
            raise CartError(f"{where}: targets.ids[{j}] and targets.logprobs[{j}] must be "
                            "non-empty lists of equal length")
        bad = next((k for k, t in enumerate(c) if not _is_token_id(t)), None)  # (t may be None)
        if bad is not None:
            raise CartError(f"{where}: targets.ids[{j}] must hold token ids (non-negative "
                            f"integers), got {c[bad]!r}")
        # NaN and infinities would make the loss, and then every trained value, NaN
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                   and x <= 1e-6 for x in lp):
            raise CartError(f"{where}: targets.logprobs[{j}] must hold finite log-probabilities "
                            "(<= 0)")
    return Conversation(str(r.get("id", where)), ids, positions, cand_ids, cand_lps, where)


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def check_vocabulary(data: ConvoSet, vocab: int) -> None:
    """Refuse token ids the model does not have (they would index past its embeddings)."""
    for c in data.convos:
        bad = next((t for t in c.token_ids if t >= vocab), None)
        if bad is not None:
            raise CartError(f"{c.where}: token_ids holds token id {bad}, outside the model's "
                            f"vocabulary ({vocab})")
        for j, ids in enumerate(c.cand_ids):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise CartError(f"{c.where}: targets.ids[{j}] holds token id {bad}, outside the "
                                f"model's vocabulary ({vocab})")
    bad = next((t for t in data.head_ids or [] if t >= vocab), None)
    if bad is not None:
        raise CartError(f"corpus_head.ids of {data.head_source} holds token id {bad}, outside "
                        f"the model's vocabulary ({vocab})")


# -- packing and batches ---------------------------------------------------------------------------
def pack(order: Sequence[int], lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedy packing in order: a row takes conversations until the next does not fit; a
    conversation longer than ``seq_len`` gets a row of its own."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:distill-epoch:{epoch}").shuffle(order)
    return order


def row_stream(lengths: Sequence[int], cfg: DistillConfig) -> Iterator[list[int]]:
    """Packed rows, epoch after epoch (each a fresh shuffle), forever. The stream does not
    depend on --steps/--epochs, so a run can be extended and resumed exactly."""
    epoch = 0
    while True:
        yield from pack(epoch_order(len(lengths), cfg.seed, epoch), lengths, cfg.seq_len)
        epoch += 1


def plan_steps(lengths: Sequence[int], cfg: DistillConfig) -> list[list[list[int]]]:
    """The rows of every optimizer step. With --steps, that many full steps; otherwise the
    rows of --epochs epochs (the last step may be smaller)."""
    stream = row_stream(lengths, cfg)
    if cfg.steps is not None:
        return [[next(stream) for _ in range(cfg.batch_size)] for _ in range(cfg.steps)]
    rows_per_epoch = [len(pack(epoch_order(len(lengths), cfg.seed, e), lengths, cfg.seq_len))
                      for e in range(cfg.epochs)]
    rows = [next(stream) for _ in range(sum(rows_per_epoch))]
    return [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]


def split_step(rows: list[list[int]], world: int, accum: int) -> list[list[list[list[int]]]]:
    """``[micro][rank] -> rows``: row j goes to micro-step j % accum... round-robin over
    (micro, rank) so every part gets a near-equal share."""
    parts = [[[] for _ in range(world)] for _ in range(accum)]
    for j, row in enumerate(rows):
        slot = j % (world * accum)
        parts[slot // world][slot % world].append(row)
    return parts


@dataclass
class Batch:
    input_ids: Any  # [B, T]
    position_ids: Any  # [B, T]
    mask: Any  # [B, 1, T, T] bool, True = may attend (the cartridge: always); None on the flex path
    segment: Any  # [B, T] conversation index of each token in its row, -1 on padding
    target_rows: Any  # [N] row of each target
    target_cols: Any  # [N] column whose output predicts the target
    cand_ids: Any  # [N, K]
    cand_probs: Any  # [N, K] teacher probabilities renormalised over the kept set (0 = padding)
    next_ids: Any  # [N] the token actually in the conversation (ntp)
    num_tokens: int
    num_targets: int


def make_batch(rows: list[list[int]], convos: Sequence[Conversation], p: int, pad_id: int,
               device: Any, dense_mask: bool | None = None) -> Batch:
    """Packed rows; every conversation's tokens at positions ``p, p+1, ...`` (``p``: the
    cartridge's query position). ``dense_mask``: build the ``[B, 1, T, T]`` mask (default:
    where ``device`` trains on the dense attention path; the flex path needs ``segment`` only)."""
    import torch

    from cart.attention import packed_mask, training_attention

    if not rows:  # a process with nothing to do this micro-step still joins the collective
        rows_t: list[list[Conversation]] = [[]]
    else:
        rows_t = [[convos[i] for i in row] for row in rows]
    width = max(1, max(sum(len(c.token_ids) for c in row) for row in rows_t))
    b = len(rows_t)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.full((b, width), p, dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)
    t_rows, t_cols, cands, probs, nexts = [], [], [], [], []
    tokens = 0
    for r, row in enumerate(rows_t):
        offset = 0
        for s, c in enumerate(row):
            n = len(c.token_ids)
            input_ids[r, offset:offset + n] = torch.tensor(c.token_ids)
            position_ids[r, offset:offset + n] = torch.arange(p, p + n)
            segment[r, offset:offset + n] = s
            for pos, ids, lps in zip(c.positions, c.cand_ids, c.cand_logprobs):
                t_rows.append(r)
                t_cols.append(offset + pos - 1)
                # renormalised over the kept candidates in log space: exp() of very low
                # log-probs (-1000) underflows to 0, and 0/0 is NaN
                cands.append(ids)
                probs.append(torch.tensor(lps, dtype=torch.float64).softmax(0).tolist())
                nexts.append(c.token_ids[pos])
            offset += n
            tokens += n
    k = max((len(c) for c in cands), default=1)
    cand_ids = torch.zeros((len(cands), k), dtype=torch.long)
    cand_probs = torch.zeros((len(cands), k), dtype=torch.float32)
    for j, (c, q) in enumerate(zip(cands, probs)):
        cand_ids[j, :len(c)] = torch.tensor(c)
        cand_probs[j, :len(q)] = torch.tensor(q)
    if dense_mask is None:
        dense_mask = training_attention(torch.device(device)) == "dense"
    mask = packed_mask(segment) if dense_mask else None  # (never T x T on a GPU)
    cuda = torch.device(device).type == "cuda"

    def put(t):  # a plain copy to a GPU waits for all its queued work (a host sync); pinned: not
        return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

    return Batch(put(input_ids), put(position_ids), None if mask is None else put(mask), put(segment),
                 put(torch.tensor(t_rows, dtype=torch.long)), put(torch.tensor(t_cols, dtype=torch.long)),
                 put(cand_ids), put(cand_probs), put(torch.tensor(nexts, dtype=torch.long)),
                 tokens, len(cands))


# -- initialisation --------------------------------------------------------------------------------
def initial_cartridge(cfg: DistillConfig, data: ConvoSet, model: Any, tokenizer: Any, identity,
                      console: Console):
    """The starting cartridge and a description of where it came from (for the metadata)."""
    import torch

    from cart.cartridge import Cartridge
    from cart.kvcache import cartridge_from_tokens

    p, frozen = cfg.tokens, cfg.frozen_tokens
    if init_is_cartridge(cfg.init):
        return loaded_init(cfg, identity)
    if cfg.init == "attention-match":
        return compacted_init(cfg, data, model, tokenizer, console)
    if cfg.init == "corpus":
        if not data.head_ids:
            raise CartError("--init corpus: the conversations carry no corpus head (cart synth "
                            "stores it in conversation 0 when it reads the corpus or a chunk "
                            "that starts it); use --init text --init-text CORPUS, or "
                            "--init random-tokens")
        if len(data.head_ids) < p:
            raise CartError(f"--init corpus: the corpus provides {len(data.head_ids)} tokens, fewer "
                            f"than -p/--tokens {p} (lower -p, or --init random-tokens)")
        ids = data.head_ids[:p]
        info = {"kind": "corpus", "source": data.head_source, "tokens": p}
    elif cfg.init == "text":
        path = Path(cfg.init_text)
        if not path.is_file():
            raise CartError(f"{path}: --init-text file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CartError(f"{path}: not UTF-8 text (byte {e.start})") from None
        all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(all_ids) < p:
            raise CartError(f"{path}: --init-text provides {len(all_ids)} tokens, fewer than "
                            f"-p/--tokens {p}")
        ids = list(all_ids[:p])
        info = {"kind": "text", "source": str(path), "tokens": p,
                "text_sha256": sha256_hex(path.read_bytes())[:16]}
    else:  # random tokens (ablation), also the basis of random vectors
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(0, int(model.config.vocab_size), (p,), generator=gen).tolist()
        info = {"kind": cfg.init, "seed": cfg.seed}
    device = next(model.parameters()).device
    cart = cartridge_from_tokens(model, torch.tensor(ids, device=device), frozen)
    cart = Cartridge(*([t.float().cpu() for t in group] for group in
                       (cart.frozen_keys, cart.frozen_values, cart.keys, cart.values)))
    if cfg.init == "random-vectors":
        # Gaussian vectors with the per-(layer, head, dim) mean and spread of real KV (the
        # KV of random tokens), so their scale is one attention is used to; the sink stays the
        # real KV of the first token
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def noise(t):
            mean, std = t.mean(dim=1, keepdim=True), t.std(dim=1, keepdim=True)
            return mean + std * torch.randn(t.shape, generator=gen)

        cart.keys = [noise(k) for k in cart.keys]
        cart.values = [noise(v) for v in cart.values]
    return cart, info


def loaded_init(cfg: DistillConfig, identity):
    """``--init CARTRIDGE``: training goes on from a cartridge file of the same p and frozen
    count (float32), its biases and query position kept."""
    from cart.cartridge import Cartridge

    p, frozen = cfg.tokens, cfg.frozen_tokens
    loaded = Cartridge.load(cfg.init, identity)
    if loaded.num_tokens != p or loaded.num_frozen != frozen:
        raise CartError(f"{cfg.init}: has p={loaded.num_tokens} ({loaded.num_frozen} frozen), "
                        f"but -p/--tokens is {p} with {frozen} frozen (give -p {loaded.num_tokens})")
    cart = Cartridge(*([t.float() for t in group] for group in
                       (loaded.frozen_keys, loaded.frozen_values, loaded.keys, loaded.values)),
                     metadata={"query_position": loaded.query_position}, biases=loaded.biases)
    previous = loaded.metadata
    return cart, {"kind": "cartridge", "source": str(cfg.init),
                  "sha256": loaded.file_sha256[:16],
                  "corpus_hash": previous.get("corpus_hash"), "steps": previous.get("steps"),
                  "init": previous.get("init")}


def compacted_init(cfg: DistillConfig, data: ConvoSet, model: Any, tokenizer: Any, console: Console):
    """``--init attention-match``: the attention-matching compaction of the corpus the
    conversations carry (``cart compact``'s defaults at this p)."""
    from cart.compact import CompactConfig, compact_ids

    p = cfg.tokens
    if not data.head_ids:
        raise CartError("--init attention-match: the conversations carry no corpus (cart synth "
                        "stores it in conversation 0 when it reads the corpus or a chunk "
                        "that starts it); use --init random-tokens")
    if len(data.head_ids) < p:
        raise CartError(f"--init attention-match: the corpus has {len(data.head_ids)} tokens, "
                        f"fewer than -p/--tokens {p} (lower -p)")
    cart = compact_ids(model, tokenizer, data.head_ids,
                       CompactConfig(tokens=p, device=str(next(model.parameters()).device)), console)
    info = {**cart.metadata["init"], "source": data.head_source}
    cart.metadata = {"query_position": cart.query_position}
    return cart, info


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_split(self, batch_size: int, grad_accum: int) -> None:
        """Refuse a step that does not split evenly over the processes and micro-steps."""
        if self.world > 1 and batch_size % (self.world * grad_accum):
            raise CartError(f"--batch-size ({batch_size}) must be a multiple of processes x "
                            f"--grad-accum ({self.world} x {grad_accum})")

    def wrap(self, module, device: str):
        """``module`` (a ``TrainableCartridge``) on ``device`` and what the steps call: the
        module itself, or its DistributedDataParallel wrapper over several processes."""
        import torch

        module = module.place(device)
        if self.world == 1:
            return module, module
        return module, torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device] if device.startswith("cuda") else None)

    def close(self) -> None:
        """Wait for every process, then leave the process group (nothing with one process)."""
        if self.world > 1:
            import torch.distributed

            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(path: Path, module, optimizer, step: int, fingerprint: str,
                    totals: dict[str, float]) -> None:
    import json

    from safetensors.torch import save

    from cart.io import atomic_write_bytes

    tensors = {}
    for i, (k, v) in enumerate(zip(module.keys, module.values)):
        tensors[f"param.{i}.keys"] = k.detach().cpu().contiguous()
        tensors[f"param.{i}.values"] = v.detach().cpu().contiguous()
    state = optimizer.state_dict()
    adam_steps = {}
    for pid, s in state["state"].items():
        tensors[f"adam.{pid}.exp_avg"] = s["exp_avg"].cpu().contiguous()
        tensors[f"adam.{pid}.exp_avg_sq"] = s["exp_avg_sq"].cpu().contiguous()
        adam_steps[str(pid)] = float(s["step"])
    meta = {"format": "cart.distill-checkpoint/1", "step": str(step), "fingerprint": fingerprint,
            "adam_steps": json.dumps(adam_steps), "totals": json.dumps(totals)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checkpoint(path: Path, module, optimizer, fingerprint: str) -> tuple[int, dict[str, float]]:
    import json

    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "cart.distill-checkpoint/1":
                raise CartError(f"{path}: not a cart distill checkpoint")
            if meta.get("fingerprint") != fingerprint:
                raise CartError(f"{path}: checkpoint of another run (different data, init or "
                                "settings); delete it to start over")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CartError:
        raise
    except Exception as e:  # a torn or foreign file
        raise CartError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "delete it to start over") from None
    with torch.no_grad():
        for i, (k, v) in enumerate(zip(module.keys, module.values)):
            k.copy_(tensors[f"param.{i}.keys"])
            v.copy_(tensors[f"param.{i}.values"])
    adam_steps = json.loads(meta["adam_steps"])
    state = optimizer.state_dict()
    for pid_text, step in adam_steps.items():
        pid = int(pid_text)
        state["state"][pid] = {"step": torch.tensor(step),
                               "exp_avg": tensors[f"adam.{pid}.exp_avg"],
                               "exp_avg_sq": tensors[f"adam.{pid}.exp_avg_sq"]}
    optimizer.load_state_dict(state)
    return int(meta["step"]), json.loads(meta["totals"])


# -- the job ---------------------------------------------------------------------------------------
def compute_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 autocast on GPUs and on CPUs with native bfloat16 arithmetic
    (AVX512-BF16 / AMX); float32 elsewhere -- without them bfloat16 matrix products are
    emulated, about 100x slower than float32 (measured on this project's 2-core AVX2 machines)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def default_output_name(data: ConvoSet, cfg: DistillConfig) -> str:
    corpus = (data.corpus or {}).get("hash") or data.digest
    return f"cartridge-{corpus[:8]}-p{cfg.tokens}.safetensors"


def check_conversations(data: ConvoSet, model: Any, identity, cfg: DistillConfig) -> None:
    """Refuse conversations of another model, with token ids past its vocabulary, or too long
    for its context behind the ``-p`` cartridge tokens."""
    m = data.model
    if (m["config_hash"], m["tokenizer_hash"]) != (identity.config_hash, identity.tokenizer_hash):
        raise CartError(f"{data.sources[0]}: conversations from model {m['id']} (config "
                        f"{m['config_hash']}, tokenizer {m['tokenizer_hash']}), not "
                        f"{identity.model_id} (config {identity.config_hash}, tokenizer "
                        f"{identity.tokenizer_hash}); give --model")
    check_vocabulary(data, int(model.config.vocab_size))
    check_fits(f"-p/--tokens {cfg.tokens}", cfg.tokens, data, model)


def check_fits(what: str, start: int, data: ConvoSet, model: Any) -> None:
    """Refuse conversations that, from position ``start`` (named ``what`` in the message), run
    past the model's context."""
    from cart.models import context_length

    max_len = max(len(c.token_ids) for c in data.convos)
    context = context_length(model.config)
    if start + max_len > context:
        raise CartError(f"{what} + the longest conversation ({max_len} tokens) exceeds the "
                        f"model's context of {context} tokens")


def forward_backward(trained, rows: list[list[int]], targets: int, grad_accum: int, dist: Dist,
                     convos: Sequence[Conversation], p: int, pad_id: int, device: Any) -> tuple[float, float]:
    """One optimizer step's gradients, accumulated: its packed ``rows`` (global) split over the
    processes and ``grad_accum`` micro-steps, each loss scaled so that the gradients are those
    of the mean over the step's ``targets`` tokens. Returns the step's loss and KL sums over its
    target tokens (all processes), read from the device once: the step's one host sync."""
    import torch

    scale = dist.world / max(targets, 1)  # DDP averages over processes
    parts = split_step(rows, dist.world, grad_accum)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss, kl), summed on the device
    for micro, per_rank in enumerate(parts):
        batch = make_batch(per_rank[dist.rank], convos, p, pad_id, device)
        sync = micro == len(parts) - 1 or dist.world == 1
        ctx = trained.no_sync() if (dist.world > 1 and not sync) else contextlib.nullcontext()
        with ctx:
            loss, l_sum, k_sum = trained(batch, scale)
            loss.backward()
        sums += torch.stack([l_sum, k_sum])
    if dist.world > 1:
        torch.distributed.all_reduce(sums)  # on the device: nccl reduces GPU tensors only
    loss_sum, kl_sum = sums.tolist()
    return loss_sum, kl_sum


def save_cartridge(module, output: str | None, data: ConvoSet, identity, init_info: dict[str, Any],
                   training: dict[str, Any], steps: int, tokens: int, loss: float,
                   query_position: int | None):
    """The trained cartridge with its metadata (cart-formats(5)), written to ``output``
    (stdout for None or ``-``). ``query_position`` is None when it is ``p``."""
    from cart import __version__

    corpus = data.corpus or {}
    metadata = {
        "base_model": identity.model_id, "model_config_hash": identity.config_hash,
        "tokenizer_hash": identity.tokenizer_hash, "corpus_hash": corpus.get("hash"),
        "corpus_tokens": corpus.get("n_tokens"), "corpus_paths": data.corpus_paths,
        "init": init_info, "synth": {**data.synth, "data_sha256": data.digest, "inputs": data.sources},
        "training": training, "steps": steps, "tokens": int(tokens),
        "loss": round(float(loss), 6) if math.isfinite(loss) else None,
        "cart_version": __version__, "query_position": query_position}
    result = module.cartridge({k: v for k, v in metadata.items() if v is not None})
    result.save(None if output in (None, "-") else output)
    return result


def distill_fingerprint(cfg: DistillConfig, data_digest: str, init_info: dict[str, Any]) -> str:
    """The run's ``run_fingerprint``: its settings (less what a resumed run may change), its
    conversations and its initialisation -- less the init's wall time (attention-match's
    ``seconds``), a measurement that differs on every run and would refuse every resume."""
    return run_fingerprint({k: v for k, v in asdict(cfg).items() if k not in ("steps", "epochs", "save_every")},
                           data_digest, {k: v for k, v in init_info.items() if k != "seconds"})


def distill(inputs: Sequence[str], cfg: DistillConfig, model_spec: str | None,
            output: str | None, checkpoint: str | None, log: str | None, console: Console):
    """The whole ``cart distill`` job. Returns the trained Cartridge (rank 0) or None."""
    import torch

    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_device, resolve_model
    from cart.trainable import TrainableCartridge

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "-" in inputs:
        raise CartError("under torchrun, give conversation files (every process reads them), "
                        "not stdin")
    data = load_conversations(inputs)
    output, checkpoint = output_paths(data, cfg, output, checkpoint, console)
    ref = resolve_model(model_spec, console)
    tokenizer = load_tokenizer(ref)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    dist.check_split(cfg.batch_size, cfg.grad_accum)
    model = load_model(ref, dtype="float32", device=device)
    identity = ModelIdentity.of(ref, model.config, tokenizer)
    check_conversations(data, model, identity, cfg)

    cart, init_info = initial_cartridge(cfg, data, model, tokenizer, identity, console)
    query_position = cart.query_position  # compacted keys keep their corpus positions
    check_fits(f"the cartridge's query position {query_position}", query_position, data, model)
    dtype = compute_dtype(cfg.dtype, device)
    module, trained = dist.wrap(TrainableCartridge(cart, model, cfg.objective, dtype), device)
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr)

    lengths = [len(c.token_ids) for c in data.convos]
    steps = plan_steps(lengths, cfg)
    fingerprint = distill_fingerprint(cfg, data.digest, init_info)
    ckpt_path = Path(checkpoint) if checkpoint else None
    start_step, totals = resume(ckpt_path, module, optimizer, fingerprint, len(steps), console)
    log_file = open_log(log, start_step) if log is not None and dist.main else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    last_loss = float("nan")
    with log_file or contextlib.nullcontext(), console.progress() as progress:
        task = progress.add_task("distill", total=len(steps), completed=start_step, status="")
        for step in range(start_step, len(steps)):
            started = time.perf_counter()
            rows = steps[step]
            step_targets = sum(len(data.convos[i].positions) for row in rows for i in row)
            step_tokens = sum(lengths[i] for row in rows for i in row)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, kl_sum = forward_backward(trained, rows, step_targets, cfg.grad_accum,
                                                dist, data.convos, query_position, pad_id, device)
            if not math.isfinite(loss_sum):  # before the step: no NaN reaches a file
                raise non_finite_loss(step + 1, rows, data.convos, module, query_position,
                                      pad_id, device)
            optimizer.step()
            seconds = time.perf_counter() - started
            last_loss = loss_sum / max(step_targets, 1)
            totals["tokens"] += step_tokens
            totals["targets"] += step_targets
            totals["seconds"] += seconds
            if log_file is not None:
                log_file.write(dumps(step_record(step + 1, len(rows), loss_sum, kl_sum, step_targets,
                                                 step_tokens, seconds, cfg.lr, totals["tokens"])))
                log_file.flush()
            progress.update(task, completed=step + 1,
                            status=f"loss {last_loss:.3f}  {step_tokens / seconds:.0f} tok/s")
            done = step + 1
            if ckpt_path is not None and dist.main and (done % cfg.save_every == 0 or done == len(steps)):
                save_checkpoint(ckpt_path, module, optimizer, done, fingerprint,
                                {**totals, "last_loss": last_loss})
    if not steps or start_step == len(steps):
        last_loss = totals.get("last_loss", last_loss)
    dist.close()
    if not dist.main:
        return None
    training = {**asdict(cfg), "compute_dtype": dtype, "processes": dist.world, "device": device,
                "seconds": round(totals["seconds"], 1)}
    result = save_cartridge(module, output, data, identity, init_info, training, len(steps),
                            totals["tokens"], last_loss,
                            query_position if query_position != cfg.tokens else None)
    if ckpt_path is not None and ckpt_path.exists():
        ckpt_path.unlink()  # the run is complete: its output replaces the checkpoint
    console.info(f"{len(steps)} steps, {totals['tokens']} tokens, final loss {last_loss:.4f}, "
                 f"{totals['tokens'] / max(totals['seconds'], 1e-9):.0f} tok/s"
                 + (f" -> {output}" if output not in (None, "-") else ""))
    return result


def output_paths(data: ConvoSet, cfg: DistillConfig, output: str | None, checkpoint: str | None,
                 console: Console) -> tuple[str | None, str | None]:
    """The cartridge's path (``auto``: ``default_output_name``, never over an existing file a
    checkpoint does not resume) and the checkpoint's (default: beside a file output)."""
    if output == "auto":
        output = default_output_name(data, cfg)
        if Path(output).exists() and not (checkpoint or Path(output + ".ckpt").exists()):
            raise CartError(f"{output} exists (the default name); give -o FILE to choose the "
                            f"file, or -o {output} to replace it")
        console.notice(f"cart: the cartridge goes to {output}")
    if checkpoint is None and output not in (None, "-") and output_destination(output)[1]:
        checkpoint = output + ".ckpt"  # none beside a pipe or device (-o >(...)), as on stdout
    return output, checkpoint


def resume(ckpt_path: Path | None, module, optimizer, fingerprint: str, steps: int,
           console: Console) -> tuple[int, dict[str, float]]:
    """The step to start at and the running totals: those of the checkpoint when there is one
    (``load_checkpoint`` checks that it is this run's), else 0 and zeros."""
    if ckpt_path is None or not ckpt_path.exists():
        return 0, {"tokens": 0, "targets": 0, "seconds": 0.0}
    start_step, totals = load_checkpoint(ckpt_path, module, optimizer, fingerprint)
    if start_step > steps:
        raise CartError(f"{ckpt_path}: holds {start_step} steps, more than this run's "
                        f"{steps} (raise --steps/--epochs or delete it)")
    console.info(f"resuming from {ckpt_path} at step {start_step} of {steps}")
    return start_step, totals


def open_log(log: str, start_step: int):
    """The ``--log`` file, open for writing, holding the records of the steps up to
    ``start_step`` that an earlier run logged."""
    # a killed run may have logged past its last checkpoint: those steps are redone
    earlier = Path(log).read_bytes() if start_step and Path(log).exists() else b""
    log_file = open(log, "wb")
    log_file.writelines(dumps(r) for r, _ in intact_records(earlier)
                        if isinstance(r.get("step"), int) and r["step"] <= start_step)
    return log_file


def step_record(step: int, rows: int, loss_sum: float, kl_sum: float, targets: int, tokens: int,
                seconds: float, lr: float, total_tokens: int) -> dict[str, Any]:
    """One ``--log`` line (cart-formats(5)): the step's mean loss and KL per target token, its
    size and speed."""
    return {"step": step, "loss": round(loss_sum / max(targets, 1), 6),
            "kl": round(kl_sum / max(targets, 1), 6), "tokens": tokens, "targets": targets,
            "rows": rows, "lr": lr, "tokens_per_s": round(tokens / seconds, 1),
            "seconds": round(seconds, 3), "total_tokens": total_tokens}


def non_finite_loss(step: int, rows: list[list[int]], convos: Sequence[Conversation], module,
                    p: int, pad_id: int, device: Any) -> CartError:
    """The error for a step whose loss is NaN or infinite: the conversations of the step are
    tried one by one to name the record at fault; when every one fails, the cartridge itself
    has diverged."""
    import torch

    members = [i for row in rows for i in row]
    failing = []
    with torch.no_grad():
        for i in members:
            _, loss_sum, _ = module(make_batch([[i]], convos, p, pad_id, device), 1.0)
            if not math.isfinite(float(loss_sum)):
                failing.append(i)
    if failing and len(failing) < len(members):
        c = convos[failing[0]]
        return CartError(f"step {step}: the loss is not finite on conversation {c.where} "
                         f"({c.id}); no cartridge written")
    c = convos[members[0]]
    return CartError(f"step {step}: the loss is not finite on every conversation of the step "
                     f"(the first: {c.where}, {c.id}): the cartridge's values are out of range "
                     "(training diverged? lower --lr); no cartridge written")
