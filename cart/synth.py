"""``cart synth``: self-study data (paper section 4.1, Algorithm 1, appendix C).

Two participants of the same model talk about a chunk of the corpus. A has the chunk in its
system prompt plus a seed prompt, and writes the user message; B has the chunk in its system
prompt and answers. For every token B writes, the top-k log-probs of B's next-token
distribution -- the model *with the chunk in context*, the teacher -- are stored with the exact
token ids of the student's sequence (the same conversation under the chat template *without* the
chunk), so ``cart distill`` needs neither the corpus nor a tokenizer pass.

Determinism: conversation ``i`` draws its chunk and seed prompt from ``Random(f"{seed}:{i}")``
and samples its messages from generators seeded by ``(seed, i, turn, participant)``, so its
draws do not depend on the rest of its batch. Conversations are generated in fixed batches of
``--batch-size``; shards take contiguous runs of batches and resume restarts at the first
incomplete batch, so sharded, resumed and uninterrupted runs write the same records.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cart.chat import render_cartridge_ids, render_ids, shared_prefix_len, system_prompt
from cart.config import MAX_BATCH, MAX_COUNT, check_at_most, check_type
from cart.engines.base import Engine, Generation, GenerationRequest
from cart.io import (CartError, Console, PartialOutput, atomic_output, check_output_path, dumps,
                     output_destination, parse_jsonl, read_jsonl, require, run_fingerprint,
                     schema_id, sha256_hex)
from cart.seeds import DEFAULT_SPEC



@dataclass
class SynthConfig:
    # The CPU-scale recipe (README, "The default recipe"): short chunks read in order, the
    # direct (recall) seed prompts, short turns. The reference implementation's GPU scale
    # is -n 64+ --seed-prompts mixed --max-tokens-a 512 --max-tokens-b 1024 --mode random
    # --min-tokens 512 --max-tokens 4096.
    num_convos: int = 96  # real corpus: 70% of the gap closed against 63% with 48
    turns: int = 1
    seed: int = 0
    seed_prompts: str = DEFAULT_SPEC
    temperature_a: float = 0.6  # reference implementation's default
    max_tokens_a: int = 64
    temperature_b: float = 0.0
    max_tokens_b: int = 192
    top_k: int = 20
    logprob_mass: float = 0.99
    stop_loops: bool = True  # cut a message that repeats itself (dropping the repeats)
    # A CPU's decode step reads every weight whatever the rows, so rows are nearly free: on
    # examples/orbital (2 threads, float32) the 96 default conversations took 330 s in batches
    # of 16, 173 s of 48 and 148 s of 96, with the same messages. 48 keeps two batches (two
    # shards, a resume point) for the default -n.
    batch_size: int = 48
    # chunking of raw corpus inputs (as `cart chunk`; random mode cuts one window per convo)
    mode: str = "sequential"
    min_tokens: int = 128
    max_tokens: int = 256
    overlap: int = 0
    description: str | None = None
    engine: str = "auto"
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        for name in ("num_convos", "turns", "seed", "max_tokens_a", "max_tokens_b", "top_k",
                     "batch_size"):
            check_type(name, getattr(self, name), int)
        for name in ("temperature_a", "temperature_b", "logprob_mass"):
            check_type(name, getattr(self, name), (int, float))
        check_type("stop_loops", self.stop_loops, bool)
        for name, low in (("num_convos", 1), ("turns", 1), ("max_tokens_a", 1),
                          ("max_tokens_b", 1), ("top_k", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                flag = "-n/--num-convos" if name == "num_convos" else "--" + name.replace("_", "-")
                raise CartError(f"{flag} must be at least {low}, got {getattr(self, name)}")
        check_at_most("-n/--num-convos", self.num_convos, MAX_COUNT)
        check_at_most("--batch-size", self.batch_size, MAX_BATCH)
        for name in ("temperature_a", "temperature_b"):
            if getattr(self, name) < 0:
                raise CartError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.logprob_mass <= 1:
            raise CartError(f"--logprob-mass must be in (0, 1], got {self.logprob_mass}")
        from cart.engines import check_runtime

        check_runtime(self.engine, self.dtype)
        self.chunk_config()  # validates the chunking settings

    def chunk_config(self):
        from cart.chunk import ChunkConfig

        return ChunkConfig(mode=self.mode, num_chunks=self.num_convos if self.mode == "random" else None,
                           min_tokens=self.min_tokens, max_tokens=self.max_tokens,
                           overlap=self.overlap, seed=self.seed, description=self.description)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CartError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise CartError(f"--shard {text}: need 0 <= i < n")
    return i, n


# -- inputs ------------------------------------------------------------------------------------
# The corpus's first tokens travel with the conversations (in the record of conversation 0: the
# first record of a run, or of its shard 0) so that `cart distill` can initialise a cartridge
# from them without the corpus.
CORPUS_HEAD_TOKENS = 131072  # the whole of any corpus attention-match compacts (~1 MiB of JSON)


def load_chunks(inputs: Sequence[str], cfg: SynthConfig, model: str | None, console: Console
                ) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Chunk records from chunk JSONL inputs, or cut from raw corpus inputs, and the corpus's
    first token ids when the inputs are the corpus itself (None for chunk JSONL inputs)."""
    from cart.chunk import chunk_corpus_with_head

    if not inputs:
        raise CartError("no input: give corpus files/directories or chunk JSONL, or - for stdin")
    stdin_bytes = sys.stdin.buffer.read() if "-" in inputs else None
    jsonl = [i for i in inputs if _is_chunk_jsonl(i, stdin_bytes)]
    if jsonl and len(jsonl) != len(inputs):
        raise CartError("give either chunk JSONL files or corpus files, not both")
    if not jsonl:
        return chunk_corpus_with_head(inputs, cfg.chunk_config(), model, console,
                                      stdin_bytes=stdin_bytes, head_tokens=CORPUS_HEAD_TOKENS)
    chunks = []
    for source in jsonl:
        for line in _chunk_lines(source, stdin_bytes):
            check_chunk(line.record, line.where)
            chunks.append(line.record)
    if not chunks:
        raise CartError(f"{', '.join(jsonl)}: no chunks")
    return chunks, None


# The fields of a chunk record that synth reads beyond id and text: each may be missing or
# null (hand-made chunk files), but when present it must have its type, or using it later
# would fail far from the line at fault.
_CHUNK_FIELDS = (("n_tokens", int), ("start", int), ("end", int), ("description", str),
                 ("corpus", dict), ("tokenizer", dict), ("sources", list))


def check_chunk(r: dict[str, Any], where: str) -> None:
    """Refuse a chunk record whose fields synth uses have the wrong type, naming the field."""
    for field, types in (("id", str), ("text", str)):
        if not isinstance(r.get(field), types):
            raise CartError(f"{where}: missing or invalid field '{field}'")
    if not r["text"].strip():
        raise CartError(f"{where}: empty chunk text")
    for field, types in _CHUNK_FIELDS:
        if r.get(field) is not None:
            require(r, field, types, where)
    tokenizer = r.get("tokenizer") or {}
    if tokenizer.get("hash") is not None:
        require(tokenizer, "hash", str, f"{where}: tokenizer")
    for i, s in enumerate(r.get("sources") or []):
        if not isinstance(s, dict):
            raise CartError(f"{where}: sources[{i}] must be an object, got {type(s).__name__}")
        if s.get("path") is not None:
            require(s, "path", str, f"{where}: sources[{i}]")


def chunk_paths(chunk: dict[str, Any]) -> list[str]:
    """The paths of a chunk's sources (those that name one)."""
    return [s["path"] for s in chunk.get("sources") or [] if s.get("path") is not None]


def chunk_tokenizer_hashes(chunks: list[dict[str, Any]]) -> set[str]:
    """The tokenizers the chunks were cut with (their hashes), where the records say."""
    return {(c.get("tokenizer") or {}).get("hash") for c in chunks} - {None}


def corpus_head(chunks: list[dict[str, Any]], head_ids: list[int] | None, tokenizer
                ) -> dict[str, Any] | None:
    """The ``corpus_head`` record field: the corpus's first tokens, from the corpus itself or,
    for chunk JSONL inputs, from the chunks that tile it from its start (the longest chunk at
    offset 0, then the longest that starts where it ends, and so on: all of a sequential
    chunking without overlap); None if no chunk starts the corpus."""
    if head_ids:
        return {"ids": head_ids, "source": "corpus"}
    longest: dict[int, dict[str, Any]] = {}  # start offset -> the longest chunk starting there
    for c in chunks:
        start, end = c.get("start"), c.get("end")
        if isinstance(c.get("text"), str) and isinstance(start, int) and isinstance(end, int) \
                and end > start and end > longest.get(start, {}).get("end", -1):
            longest[start] = c
    chain, offset, ids = [], 0, []
    while offset in longest and len(ids) < CORPUS_HEAD_TOKENS:
        chain.append(longest[offset])
        ids += tokenizer(chain[-1]["text"], add_special_tokens=False)["input_ids"]
        offset = chain[-1]["end"]
    if not chain:
        return None
    source = (f"chunk {chain[0]['id']}" if len(chain) == 1 else
              f"chunks {chain[0]['id']}..{chain[-1]['id']} ({len(chain)})")
    return {"ids": list(ids[:CORPUS_HEAD_TOKENS]), "source": source}


def _is_chunk_jsonl(item: str, stdin_bytes: bytes | None) -> bool:
    if item == "-":
        head = (stdin_bytes or b"").lstrip()[:64]
        return head.startswith(b"{") and b'"schema"' in (stdin_bytes or b"")[:4096]
    return item.endswith(".jsonl")


def _chunk_lines(source: str, stdin_bytes: bytes | None):
    if source != "-":
        return read_jsonl(source, kind="chunk")
    return parse_jsonl(stdin_bytes.splitlines(), "<stdin>", kind="chunk")


# -- the plan: which chunk and seed prompt each conversation gets -------------------------------
@dataclass
class Planned:
    index: int
    chunk: dict[str, Any]
    seed_type: str
    seed_text: str


def plan(chunks: list[dict[str, Any]], cfg: SynthConfig, seeds) -> list[Planned]:
    """Conversation i -> (chunk, seed prompt). Chunks are used evenly: each epoch over the
    chunks is a fresh shuffle, so every chunk is visited before any repeats."""
    order: list[int] = []
    epoch = 0
    while len(order) < cfg.num_convos:
        perm = list(range(len(chunks)))
        random.Random(f"{cfg.seed}:epoch:{epoch}").shuffle(perm)
        order.extend(perm)
        epoch += 1
    out = []
    for i in range(cfg.num_convos):
        chunk = chunks[order[i]]
        seed_type, seed_text = seeds.sample(random.Random(f"{cfg.seed}:{i}"), chunk["text"])
        out.append(Planned(i, chunk, seed_type, seed_text))
    return out


# -- the algorithm -----------------------------------------------------------------------------
def keep_mass(ids: list[int], logprobs: list[float], mass: float) -> tuple[list[int], list[float]]:
    """The top candidates up to cumulative probability ``mass`` (at least one)."""
    total = 0.0
    for n, lp in enumerate(logprobs, start=1):
        total += math.exp(lp)
        if total >= mass:
            return ids[:n], logprobs[:n]
    return ids, logprobs


def synthesize_batch(engine: Engine, batch: list[Planned], cfg: SynthConfig, batch_index: int,
                     run: str, meta: dict[str, Any], direct: frozenset[str] | set[str] = frozenset()
                     ) -> list[dict[str, Any]]:
    """Algorithm 1 for one batch of conversations -> cart.convo/1 records. Conversations whose
    seed type is in ``direct`` open with the seed prompt itself as the user message (A's first
    turn is skipped)."""
    tok = engine.tokenizer
    prefix = [shared_prefix_len(tok, system_prompt(p.chunk)) for p in batch]
    a_msgs = [[{"role": "system", "content": system_prompt(p.chunk)},
               {"role": "user", "content": p.seed_text}] for p in batch]
    b_msgs = [[{"role": "system", "content": system_prompt(p.chunk)}] for p in batch]
    convo: list[list[dict[str, Any]]] = [[] for _ in batch]  # user text / assistant ids
    targets = [[] for _ in batch]  # per conversation: per B turn, list of TopK
    stats = [{"a_tokens": [], "b_tokens": [], "b_finished": [], "looped": []} for _ in batch]
    for turn in range(cfg.turns):
        asked = [i for i, p in enumerate(batch) if turn > 0 or p.seed_type not in direct]
        generated = engine.generate(
            [GenerationRequest(render_ids(tok, a_msgs[i], True)[0], cfg.max_tokens_a,
                               cfg.temperature_a, prefix_len=prefix[i], stop_loops=cfg.stop_loops,
                               seed=_derive(cfg.seed, batch[i].index, turn, "a"))
             for i in asked], seed=_derive(cfg.seed, batch_index, turn, "a"))
        a_out = [Generation(tok(p.seed_text, add_special_tokens=False)["input_ids"], True)
                 for p in batch]  # direct seeds: the seed prompt is the message
        for i, g in zip(asked, generated):
            a_out[i] = g
        a_texts = [tok.decode(g.token_ids, skip_special_tokens=True).strip() for g in a_out]
        for i, text in enumerate(a_texts):
            b_msgs[i].append({"role": "user", "content": text})
            convo[i].append({"role": "user", "content": text})
            a_msgs[i].append({"role": "assistant", "content": _strip_eos(a_out[i].token_ids, engine)})
            stats[i]["a_tokens"].append(len(a_out[i].token_ids) if i in asked else 0)
        b_out = engine.generate(
            [GenerationRequest(render_ids(tok, m, True)[0], cfg.max_tokens_b, cfg.temperature_b,
                               top_k_logprobs=cfg.top_k, prefix_len=n, stop_loops=cfg.stop_loops,
                               seed=_derive(cfg.seed, p.index, turn, "b"))
             for m, n, p in zip(b_msgs, prefix, batch)],
            seed=_derive(cfg.seed, batch_index, turn, "b"))
        for i, g in enumerate(b_out):
            answer = _strip_eos(g.token_ids, engine)
            b_msgs[i].append({"role": "assistant", "content": answer})
            convo[i].append({"role": "assistant", "content": answer})
            a_msgs[i].append({"role": "user", "content": tok.decode(answer, skip_special_tokens=True).strip()})
            # targets cover the answer and the EOS that closed it (the template writes the same
            # end-of-turn token after the spliced answer)
            targets[i].append(g.topk[: len(answer) + (1 if g.finished else 0)])
            stats[i]["b_tokens"].append(len(g.token_ids))
            stats[i]["b_finished"].append(g.finished)
            stats[i]["looped"].append([a_out[i].looped, g.looped])
    records = []
    for i, p in enumerate(batch):
        # the student's sequence: what follows a cartridge (cart.chat.render_cartridge_ids)
        ids, spans = render_cartridge_ids(tok, convo[i], add_generation_prompt=False)
        positions, cand_ids, cand_lps = [], [], []
        for (start, end), turn_targets in zip(spans, targets[i]):
            for offset, topk in enumerate(turn_targets):
                pos = start + offset
                if pos >= len(ids):
                    break
                kept_ids, kept_lps = keep_mass(topk.ids, topk.logprobs, cfg.logprob_mass)
                positions.append(pos)
                cand_ids.append(kept_ids)
                cand_lps.append([round(x, 6) for x in kept_lps])
        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                     else tok.decode(m["content"], skip_special_tokens=True)} for m in convo[i]]
        records.append({
            "schema": schema_id("convo"),
            "id": f"convo-{run}-{p.index:06d}",
            "index": p.index,
            "run": run,
            "chunk": {"id": p.chunk["id"], "n_tokens": p.chunk.get("n_tokens"),
                      "paths": chunk_paths(p.chunk)},
            "seed_prompt": {"type": p.seed_type, "text": p.seed_text},
            "messages": messages,
            "token_ids": ids,
            "targets": {"positions": positions, "ids": cand_ids, "logprobs": cand_lps},
            "stats": stats[i],
            **meta,
        })
    return records


def _strip_eos(ids: list[int], engine: Engine) -> list[int]:
    return ids[:-1] if ids and ids[-1] in engine.eos_token_ids else list(ids)


def _derive(*parts: Any) -> int:
    return int(sha256_hex(":".join(map(str, parts)))[:15], 16)


def check_context(engine: Engine, planned: list[Planned], cfg: SynthConfig) -> None:
    """Refuse chunks whose prompts plus generation budgets exceed the model's context."""
    budget = engine.max_context
    seen = set()
    for p in planned:
        if p.chunk["id"] in seen:
            continue
        seen.add(p.chunk["id"])
        n = len(render_ids(engine.tokenizer, [{"role": "system", "content": system_prompt(p.chunk)},
                                              {"role": "user", "content": p.seed_text}], True)[0])
        need = n + cfg.turns * (cfg.max_tokens_a + cfg.max_tokens_b)
        if need > budget:
            raise CartError(
                f"chunk {p.chunk['id']}: {n} prompt tokens + {cfg.turns} turn(s) x "
                f"(--max-tokens-a {cfg.max_tokens_a} + --max-tokens-b {cfg.max_tokens_b}) = {need} "
                f"exceeds the model's context of {budget} tokens (use smaller chunks or budgets)")


# -- running, with shards and resume -------------------------------------------------------------
def batches_of(planned: list[Planned], batch_size: int, shard: tuple[int, int]) -> list[list[Planned]]:
    batches = [planned[i:i + batch_size] for i in range(0, len(planned), batch_size)]
    i, n = shard
    per = len(batches) / n
    return batches[round(i * per):round((i + 1) * per)]


def whole_batches(earlier: list[tuple[dict, int]], batches: list[list[Planned]]) -> tuple[int, int]:
    """How many whole batches the records of a partial file (``PartialOutput.earlier``) hold,
    and the byte offset past them: what follows (a kill mid-batch) is redone."""
    n_batches, pos_in_batch, good_end = 0, 0, 0
    for record, offset in earlier:
        if n_batches >= len(batches) or record.get("index") != batches[n_batches][pos_in_batch].index:
            break
        pos_in_batch += 1
        if pos_in_batch == len(batches[n_batches]):
            n_batches, pos_in_batch, good_end = n_batches + 1, 0, offset
    return n_batches, good_end


def _complete(path: Path, run: str, batches: list[list[Planned]]) -> bool:
    """Whether ``path`` already holds exactly this run's (and this shard's) conversations."""
    try:
        got = [(line.record.get("run"), line.record.get("index"))
               for line in read_jsonl(path, kind="convo")]
    except CartError:
        return False
    return got == [(run, p.index) for batch in batches for p in batch]


def synthesize(inputs: Sequence[str], cfg: SynthConfig, model: str | None, output: str | None,
               shard: tuple[int, int], console: Console) -> int:
    """The whole ``cart synth`` job. Returns the number of conversations written."""
    from cart.engines import get_engine, with_runtime
    from cart.models import resolve_device
    from cart.seeds import get_seed_prompts

    cfg = with_runtime(cfg)
    seeds = get_seed_prompts(cfg.seed_prompts)
    chunks, head_ids = load_chunks(inputs, cfg, model, console)
    engine = get_engine(cfg.engine, model, dtype=cfg.dtype, device=resolve_device(cfg.device),
                        console=console, top_k=cfg.top_k)
    vocab = len(engine.tokenizer)
    if cfg.top_k > vocab:  # more candidates than tokens: the engine's top-k would fail
        raise CartError(f"--top-k {cfg.top_k} is more than the model's vocabulary ({vocab} tokens)")
    tok_hashes = chunk_tokenizer_hashes(chunks)
    if tok_hashes and tok_hashes != {engine.identity.tokenizer_hash}:
        console.warn("the chunks were cut with another tokenizer than the model's; their token "
                     "counts are approximate for this model")
    planned = plan(chunks, cfg, seeds)
    check_context(engine, planned, cfg)
    run = run_fingerprint(asdict(cfg), [c["id"] for c in chunks], engine.identity.config_hash,
                          engine.identity.tokenizer_hash)
    ident = engine.identity
    meta = {
        "model": {"id": ident.model_id, "config_hash": ident.config_hash,
                  "tokenizer_hash": ident.tokenizer_hash},
        "corpus": chunks[0].get("corpus"),
        "config": {**asdict(cfg), "seed_prompts_resolved": seeds.describe()},
    }
    head = corpus_head(chunks, head_ids, engine.tokenizer)
    batches = batches_of(planned, cfg.batch_size, shard)
    # A file is built as FILE.partial, which a rerun resumes; stdout, or a pipe or device
    # (-o >(...)), takes the conversations as they come.
    live, partial = contextlib.ExitStack(), None
    if output not in (None, "-") and output_destination(output)[1]:
        partial = PartialOutput(check_output_path(output), run, "holds conversations of another "
                                "run (different settings, chunks or model)")
        out_path = partial.output
        if out_path.exists() and not partial.path.exists() and _complete(out_path, run, batches):
            console.info(f"{out_path} is already complete")
            return 0
        done, end = whole_batches(partial.earlier, batches)
        if done:
            console.info(f"resuming {partial.path}: {done} of {len(batches)} batches already done")
        partial.resume(end)
    else:
        done, sink = 0, live.enter_context(atomic_output(output))
    total = sum(len(b) for b in batches)
    written = sum(len(b) for b in batches[:done])
    started, tokens = time.perf_counter(), 0
    try:
        with console.progress() as progress:
            task = progress.add_task("synth", total=total, completed=written, status="")
            for b_index, batch in enumerate(batches[done:], start=done):
                records = synthesize_batch(engine, batch, cfg, batch[0].index // cfg.batch_size,
                                           run, meta, seeds.direct_names)
                if head is not None and records[0]["index"] == 0:
                    # once per run, in conversation 0: shards concatenate to the whole run
                    records[0]["corpus_head"] = head
                if partial is not None:
                    partial.append(records)
                else:
                    sink.write(b"".join(dumps(r) for r in records))
                    sink.flush()
                written += len(records)
                tokens += sum(sum(r["stats"]["a_tokens"]) + sum(r["stats"]["b_tokens"]) for r in records)
                rate = tokens / (time.perf_counter() - started)
                progress.update(task, completed=written, status=f"{rate:.0f} gen tok/s")
    finally:
        live.close()
    if partial is not None:
        partial.finish()
    elapsed = time.perf_counter() - started
    console.info(f"{written} conversations ({tokens} generated tokens) in {elapsed:.0f} s")
    return written
