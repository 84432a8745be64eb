"""``cart chunk``: corpus files -> token-window chunks (``cart.chunk/1`` JSONL).

The corpus is the documents of all inputs, in order (directories walked recursively in sorted
order), tokenized with the model's tokenizer and laid end to end as one token stream, so small
files (a codebase) still give full windows. A window records which documents it spans.

Modes (paper, appendix C.2):
* ``random``: ``-n`` windows with lengths uniform in [min, max] and uniform start positions,
  reproducible from ``--seed``;
* ``sequential``: windows of ``--max-tokens`` every ``max - overlap`` tokens, the last one
  ending at the corpus end.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cart.config import MAX_COUNT, check_at_most, check_type
from cart.io import STDIO, CartError, Console, schema_id, sha256_hex

MODES = ("random", "sequential")
BINARY_SNIFF_BYTES = 8192
DOCUMENT_SEPARATOR = "\n\n"  # between the texts of documents a window spans


@dataclass
class ChunkConfig:
    mode: str = "random"
    num_chunks: int | None = None  # random: None = as many as cover the corpus once on average
    min_tokens: int = 512
    max_tokens: int = 4096
    overlap: int = 0
    seed: int = 0
    description: str | None = None

    def __post_init__(self):
        check_type("mode", self.mode, str)
        if self.mode not in MODES:
            raise CartError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("min_tokens", "max_tokens", "overlap", "seed"):
            check_type(name, getattr(self, name), int)
        if self.num_chunks is not None:
            check_type("num_chunks", self.num_chunks, int)
            if self.num_chunks < 1:
                raise CartError(f"-n/--num-chunks must be at least 1, got {self.num_chunks}")
            check_at_most("-n/--num-chunks", self.num_chunks, MAX_COUNT)
        if self.min_tokens < 1:
            raise CartError(f"--min-tokens must be at least 1, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise CartError(f"--min-tokens {self.min_tokens} is larger than "
                            f"--max-tokens {self.max_tokens}")
        if not 0 <= self.overlap < self.max_tokens:
            raise CartError(f"--overlap must be in [0, --max-tokens), got {self.overlap}")
        if self.description is not None:
            check_type("description", self.description, str)


@dataclass
class Document:
    path: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)  # char span of each token


# -- reading the corpus ------------------------------------------------------------------------
def read_corpus(inputs: Sequence[str], console: Console, stdin_bytes: bytes | None = None
                ) -> list[Document]:
    """The text documents of the inputs. Named files must be text; directories skip the rest.
    ``stdin_bytes``: stdin already read by the caller (who sniffed its format)."""
    if not inputs:
        raise CartError("no input: give corpus files or directories, or - for stdin")
    docs: list[Document] = []
    for item in inputs:
        if item == STDIO:
            data = stdin_bytes if stdin_bytes is not None else sys.stdin.buffer.read()
            docs.append(Document(STDIO, _decode(data, "<stdin>")))
            continue
        p = Path(item)
        if p.is_dir():
            found = list(_walk_text_files(p, console))
            if not found:
                raise CartError(f"{p}: no text files found in directory")
            docs.extend(found)
        elif p.is_file():
            docs.append(Document(str(p), _decode(_read(p), str(p))))
        elif p.exists():
            raise CartError(f"{p}: not a regular file or directory")
        else:
            raise CartError(f"{p}: no such file or directory")
    if not any(d.text.strip() for d in docs):
        raise CartError(f"{_names(inputs)}: corpus is empty")
    return docs


def corpus_text(docs: Sequence[Document]) -> str:
    """The corpus as one text, as ``cart eval --icl`` puts it in context: the documents in
    order, their outer newlines stripped, a blank line between them."""
    return DOCUMENT_SEPARATOR.join(d.text.strip("\n") for d in docs if d.text.strip())


def display(path: str) -> str:
    return "<stdin>" if path == STDIO else path


def _names(inputs: Sequence[str]) -> str:
    """The inputs, for messages about the corpus as a whole."""
    shown = ", ".join(display(str(i)) for i in inputs[:3])
    return shown + (", ..." if len(inputs) > 3 else "")


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise CartError(f"{p}: cannot read: {e.strerror}") from None


def _decode(data: bytes, name: str) -> str:
    """Strict UTF-8 (a BOM is dropped). Binary data and invalid bytes are errors."""
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise CartError(f"{name}: binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CartError(f"{name}: not valid UTF-8 text "
                        f"(byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _walk_text_files(root: Path, console: Console) -> Iterator[Document]:
    # Sorted, hidden entries (.git, .venv ...) skipped, symlinked directories not followed.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if not p.is_file():
                continue
            try:
                text = _decode(_read(p), str(p))
            except CartError as e:
                console.warn(f"skipping {e}")
                continue
            yield Document(str(p), text)


# -- tokenizing and cutting --------------------------------------------------------------------
def tokenize_documents(docs: list[Document], tokenizer: Any) -> list[Document]:
    """Fill token ids and char offsets; documents with no tokens are dropped."""
    out = []
    for doc in docs:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        doc.token_ids = list(enc["input_ids"])
        doc.offsets = [tuple(o) for o in enc["offset_mapping"]]
        if doc.token_ids:
            out.append(doc)
    return out


def corpus_hash(docs: Sequence[Document]) -> str:
    """Content hash of the corpus (texts in order; paths excluded so stdin == file)."""
    return sha256_hex("\0".join(d.text for d in docs))[:16]


def windows(total: int, cfg: ChunkConfig) -> list[tuple[int, int]]:
    """[start, end) token windows over a stream of ``total`` tokens."""
    if total < cfg.min_tokens:
        raise CartError(f"corpus has {total} tokens, fewer than --min-tokens {cfg.min_tokens} "
                        "(lower --min-tokens)")
    max_len = min(cfg.max_tokens, total)
    if cfg.mode == "random":
        n = cfg.num_chunks or max(1, math.ceil(total / ((cfg.min_tokens + max_len) / 2)))
        rng = random.Random(cfg.seed)
        out = []
        for _ in range(n):
            length = rng.randint(cfg.min_tokens, max_len)
            start = rng.randint(0, total - length)
            out.append((start, start + length))
        return out
    stride = max_len - cfg.overlap  # only used when the corpus is longer than one window
    out = []
    start = 0
    while True:
        end = min(start + max_len, total)
        if end - start < cfg.min_tokens:  # a short tail: align the last window to the end
            start = max(0, end - max_len)
        out.append((start, end))
        if end >= total:
            break
        start += stride
    return out[: cfg.num_chunks] if cfg.num_chunks else out


def chunk_records(docs: list[Document], cfg: ChunkConfig, tokenizer_identity: dict[str, str]
                  ) -> Iterator[dict[str, Any]]:
    """``cart.chunk/1`` records for tokenized documents."""
    starts = []  # global token offset of each document
    total = 0
    for d in docs:
        starts.append(total)
        total += len(d.token_ids)
    c_hash = corpus_hash(docs)
    corpus = {"hash": c_hash, "n_tokens": total, "n_documents": len(docs)}
    config = asdict(cfg)
    config.pop("description")
    for start, end in windows(total, cfg):
        sources, texts = [], []
        for d, d_start in zip(docs, starts):
            lo, hi = max(start, d_start), min(end, d_start + len(d.token_ids))
            if lo >= hi:
                continue
            a, b = lo - d_start, hi - d_start
            c0, c1 = d.offsets[a][0], d.offsets[b - 1][1]
            sources.append({"path": d.path, "start": a, "end": b, "char_start": c0, "char_end": c1})
            texts.append(d.text[c0:c1])
        yield {
            "schema": schema_id("chunk"),
            "id": "chunk-" + sha256_hex(f"{c_hash}:{tokenizer_identity['hash']}:{start}:{end}")[:16],
            "text": DOCUMENT_SEPARATOR.join(texts),
            "n_tokens": end - start,
            "start": start,
            "end": end,
            "sources": sources,
            "description": cfg.description,
            "corpus": corpus,
            "tokenizer": tokenizer_identity,
            "config": config,
        }


def coverage(records: Sequence[dict[str, Any]], total: int) -> float:
    """Share of corpus tokens inside at least one window."""
    covered = bytearray(total)
    for r in records:
        covered[r["start"]:r["end"]] = b"\1" * (r["end"] - r["start"])
    return sum(covered) / max(total, 1)


def chunk_corpus(inputs: Sequence[str], cfg: ChunkConfig, model: str | None,
                 console: Console, stdin_bytes: bytes | None = None) -> list[dict[str, Any]]:
    """Read, tokenize and cut a corpus: the whole ``cart chunk`` job as a function."""
    return chunk_corpus_with_head(inputs, cfg, model, console, stdin_bytes)[0]


def chunk_corpus_with_head(inputs: Sequence[str], cfg: ChunkConfig, model: str | None,
                           console: Console, stdin_bytes: bytes | None = None,
                           head_tokens: int = 0) -> tuple[list[dict[str, Any]], list[int]]:
    """``chunk_corpus`` plus the corpus's first ``head_tokens`` token ids (documents in order),
    which ``cart synth`` hands on so ``cart distill`` can initialise from them."""
    from cart.models import load_tokenizer, resolve_model, tokenizer_hash

    docs = read_corpus(inputs, console, stdin_bytes)
    ref = resolve_model(model, console)
    tokenizer = load_tokenizer(ref)
    docs = tokenize_documents(docs, tokenizer)
    if not docs:
        raise CartError(f"{_names(inputs)}: corpus is empty")
    total = sum(len(d.token_ids) for d in docs)
    if total < cfg.min_tokens:
        raise CartError(f"{_names(inputs)}: corpus has {total} tokens, fewer than --min-tokens "
                        f"{cfg.min_tokens} (lower --min-tokens)")
    identity = {"model": ref.model_id, "hash": tokenizer_hash(tokenizer)}
    records = list(chunk_records(docs, cfg, identity))
    total = records[0]["corpus"]["n_tokens"]
    console.info(f"{len(records)} chunks from {len(docs)} document(s), {total} corpus tokens, "
                 f"{coverage(records, total):.0%} of the corpus covered")
    head: list[int] = []
    for d in docs:
        if len(head) >= head_tokens:
            break
        head.extend(d.token_ids[: head_tokens - len(head)])
    return records, head
