#!/usr/bin/env python3
"""Build evaluation corpora from *real* text that nobody on this project wrote.

Three corpora, each with a ``cart.questions/1`` question set, are written to
``OUT_DIR/<name>/corpus.md`` and ``OUT_DIR/<name>/questions.jsonl``:

* ``real``   -- a contiguous excerpt (about 2,500 SmolLM2 tokens) of the sacreBLEU README,
  with 30 short-answer questions spread over its beginning, middle and end;
* ``needle`` -- the ``real`` text with 8 "special magic number" facts inserted at spread
  depths (as in RULER's needle-in-a-haystack tasks), and one question per needle;
* ``long``   -- the whole orjson README (about 11,800 tokens, longer than SmolLM2's
  8,192-token context), with 22 questions: 12 about its first 6,000 tokens
  (``"part": "head"``, answerable by in-context learning on the part that fits) and 10
  about text after token 8,192 (``"part": "tail"``).

The text is **not** in this repository: it is read at run time from the long description
(``*.dist-info/METADATA``) of two packages installed from PyPI as runtime dependencies of
``cart`` (sacrebleu and orjson). The questions, answers and needle facts are written here,
against the exact versions pinned in ``SOURCES``; if the installed version, or the text it
ships, differs, the script stops with a one-line error instead of writing questions that
may disagree with the text.

The markdown is cleaned lightly (badge and image lines and link targets are dropped; table
cells are unpadded and separator rows removed); the words and code blocks are the authors'.
The output depends only on the pinned text, this file and cart's SmolLM2 tokenizer (which
places the needles at token depths): no randomness other than a fixed seed, no timestamps,
so reruns write byte-identical files.

Before writing anything the script checks that every answer appears verbatim in its
corpus, that token counts are in range, that the questions cover the beginning, middle
and end of the text, that the needles sit near their target depths, and (``long``) that
each head answer lies in the first 6,000 tokens and no tail answer occurs in the first
8,192. Tokens are counted with cart's SmolLM2 tokenizer.

Usage::

    .venv/bin/python examples/realtext.py OUT_DIR              # real, needle and long
    .venv/bin/python examples/realtext.py OUT_DIR --only real  # just one (repeatable)

From Python: ``build(out_dir, only=None) -> {name: OUT_DIR/name}``.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import importlib.metadata
import json
import random
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "cart.questions/1"
CORPORA = ("real", "needle", "long")
SEED = 20_250_611

REAL_TOKENS = (1_800, 3_000)
NEEDLE_TOKENS = (1_800, 3_300)
LONG_TOKENS = (10_000, 20_000)
HEAD_LIMIT = 6_000  # head answers end before this token
CONTEXT = 8_192  # SmolLM2's context; tail answers start at or after this token
MIN_PER_THIRD = 8  # real: questions about each third of the text
MIN_HEAD = MIN_TAIL = 8
NEEDLE_DEPTHS = (0.05, 0.17, 0.30, 0.42, 0.55, 0.67, 0.80, 0.95)
NEEDLE_TOLERANCE = 0.05  # allowed |token depth - target depth|


class RealTextError(Exception):
    """A failed check or a missing/mismatched source package (one line)."""


# --------------------------------------------------------------------------
# Sources: what the questions were written against
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    sha256: str  # of the long description (METADATA body) as read, before cleaning

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {
    "sacrebleu": Source("sacrebleu", "2.6.0",
                        "4ad9f6c11fbcc08b7aa4b678e48c97ab224c6cb3b777ed4dfa646925867cf83b"),
    "orjson": Source("orjson", "3.13.0",
                     "17582dd725f574b33a0b01c109dc087d2be3d9d3bb9cda732c1ec3a1ea31ba36"),
}

# real: the README from its title up to (not including) this heading
REAL_START, REAL_END = "# sacreBLEU\n", "### Using multiple metrics\n"


def read_long_description(src: Source) -> str:
    """The package's long description, from its installed ``METADATA``, checked against the pin."""
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        raise RealTextError(f"{src.package} is not installed; the questions were written "
                            f"against {src.pin} (pip install '{src.pin}')") from None
    if dist.version != src.version:
        raise RealTextError(f"{src.package} {dist.version} is installed, but the questions were "
                            f"written against {src.pin} (pip install '{src.pin}')")
    meta = dist.read_text("METADATA")
    if meta is None or "\n\n" not in meta:
        raise RealTextError(f"{src.pin}: no long description in its METADATA; expected the "
                            f"PyPI release of {src.pin}")
    text = meta.split("\n\n", 1)[1]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != src.sha256:
        raise RealTextError(f"{src.pin}: its long description has sha256 {digest[:12]}..., "
                            f"expected {src.sha256[:12]}... (the PyPI release of {src.pin})")
    return text


_LINK = re.compile(r"\[([^\]]*)\]\([^)\s]*\)")
_AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")
_TABLE_RULE = re.compile(r"\|[-:| ]+\|")


def clean_markdown(text: str) -> str:
    """Light clean-up: drop badge and image lines and link targets (keeping the link text);
    unpad table cells and drop their separator rows. Code blocks and the words stay as
    written."""
    out = []
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith(("[![", "![")) or _TABLE_RULE.fullmatch(s):
            continue
        if s.startswith("|") and s.endswith("|") and len(s) > 1:
            line = "| " + " | ".join(c.strip() for c in s[1:-1].split("|")) + " |"
        line = _AUTOLINK.sub(r"\1", _LINK.sub(r"\1", line))
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def real_text() -> str:
    text = clean_markdown(read_long_description(SOURCES["sacrebleu"]))
    start, end = text.find(REAL_START), text.find(REAL_END)
    if start < 0 or end < start:
        raise RealTextError(f"{SOURCES['sacrebleu'].pin}: cannot find the excerpt's first "
                            f"heading {REAL_START.strip()!r} or the next one {REAL_END.strip()!r}")
    return text[start:end].rstrip() + "\n"


def long_text() -> str:
    return clean_markdown(read_long_description(SOURCES["orjson"]))


# --------------------------------------------------------------------------
# Questions (written for this project). Each: (question, answers, evidence), where the
# evidence is a verbatim span of the corpus, occurring once, that contains answers[0];
# it places the answer in the text for the coverage checks.
# --------------------------------------------------------------------------

REAL_QUESTIONS: list[tuple[str, list[str], str]] = [
    # beginning
    ("Which author's 2018 paper introduced SacreBLEU?", ["Post"],
     "SacreBLEU (Post, 2018) provides"),
    ("Whose Perl script inspired SacreBLEU?", ["Rico Sennrich", "Sennrich"],
     "Inspired by Rico Sennrich's"),
    ("Whose original reference implementation of BLEU does SacreBLEU wrap?",
     ["Papineni et al., 2002", "Papineni"],
     "reference implementation (Papineni et al., 2002)"),
    ("Which test set is given as an example that you can simply tell SacreBLEU to score against?",
     ["wmt14"], "score against `wmt14`"),
    ("Which official WMT script does SacreBLEU produce the same values as?", ["mteval-v13a.pl"],
     "the official script (`mteval-v13a.pl`)"),
    ("What does TER stand for?", ["Translation error rate"],
     "**Translation error rate (TER)**"),
    ("Besides paired bootstrap resampling, which paired significance test does SacreBLEU perform?",
     ["paired approximate randomization", "approximate randomization"],
     "paired approximate randomization tests"),
    ("As of v2.0.0, what is SacreBLEU's default output format?", ["json"],
     "the default output format is changed to `json`"),
    ("Which utility is suggested for parsing SacreBLEU's JSON output?", ["jq"],
     "the JSON using for example the `jq` utility"),
    ("Which environment variable can be exported to keep the old textual output persistently?",
     ["SACREBLEU_FORMAT", "SACREBLEU_FORMAT=text"],
     "by exporting `SACREBLEU_FORMAT=text` in relevant"),
    # middle
    ("What is the minimum Python version SacreBLEU supports?", ["3.9", "Python>=3.9"],
     "(**Python>=3.9 only**)"),
    ("Through which package is Japanese tokenizer support installed?", ["mecab-python3"],
     "Japanese tokenizer support through `mecab-python3`"),
    ("Through which package is Korean tokenizer support installed?", ["pymecab-ko"],
     "Korean tokenizer support through `pymecab-ko`"),
    ("Which command lists the available test sets?", ["sacrebleu --list", "--list"],
     "available test sets with `sacrebleu --list`"),
    ("Which file has an up-to-date list of supported datasets?", ["DATASETS.md"],
     "Please see DATASETS.md"),
    ("Which language pair is used in the example that lists the test sets for a given language "
     "pair?", ["en-fr"], "`sacrebleu --list -l en-fr`"),
    ("In the download example, which script holds the translation system?", ["translate.sh"],
     "translation system\nin `translate.sh`"),
    ("Whose system outputs are echoed from the wmt21/systems test set in the example?",
     ["NiuTrans"], "-l zh-en --echo NiuTrans\n"),
    ("What BLEU score does the JSON output example report?", ["20.8"], '"score": 20.8,'),
    ("What hypothesis length (hyp_len) does the example output report?", ["62880"],
     '"verbose_score": "54.4/26.6/14.9/8.7 (BP = 1.000 ratio = 1.026 hyp_len = 62880'),
    ("Which tokenizer is recorded in the tok field of the example JSON output?", ["13a"],
     '"tok": "13a"'),
    # end
    ("In the scoring example, which file holds the detokenized translations?",
     ["output.detok.txt"], "translations are in a file called `output.detok.txt`"),
    ("In Option 1 of the scoring example, where is the system output redirected?", ["STDIN"],
     "Redirect system output to STDIN"),
    ("Which flag gives a short version of the signature?", ["--short", "-sh"],
     "signature with `--short/-sh`"),
    ("Which flag prints only the score?", ["--score-only"], "use the `--score-only/-b` flag"),
    ("Which flag configures the precision of the scores?", ["--width"],
     "configured via the `--width/-w` flag"),
    ("What score is printed with four digits of precision (-w 4)?", ["20.7965"],
     "output.detok.txt -b -w 4\n20.7965"),
    ("When scoring against your own references, in what form must the reference and hypotheses "
     "files be?", ["detokenized"], "do not forget to provide **detokenized**"),
    ("In the example, to which file is the reference saved?", ["ref.detok.txt"],
     "--echo ref > ref.detok.txt"),
    ("Redirecting the system output into STDIN is compatible with which script's way of doing "
     "things?", ["multi-bleu.perl"], "(Compatible with multi-bleu.perl way of doing things)"),
]

LONG_QUESTIONS: list[tuple[str, str, list[str], str]] = [
    # head: within the first 6,000 tokens
    ("head", "How many times as fast as json is orjson.dumps() said to be?", ["10x", "10"],
     "something like 10x as fast as `json`, serializes"),
    ("head", "What is the newest CPython version orjson supports?", ["3.15"],
     "3.13, 3.14, and 3.15."),
    ("head", "Which instruction set extension do orjson's amd64 wheels use at runtime if available?",
     ["AVX-512"], "use AVX-512 if available"),
    ("head", "Besides GitHub, on which site is orjson's alternative repository?",
     ["codeberg.org/ijl/orjson", "codeberg"], "alternative repository is codeberg.org/ijl/orjson"),
    ("head", "Which PEP's free-threading may orjson support once it is stable?", ["PEP 703"],
     "may support PEP 703 free-threading"),
    ("head", "Which Python implementation does orjson not and will not support?", ["PyPy"],
     "will not support PyPy"),
    ("head", "What type does orjson.dumps return, where json.dumps returns a str?", ["bytes"],
     "`orjson.dumps` returns `bytes`"),
    ("head", "Which orjson option replaces the standard library's indent?", ["OPT_INDENT_2"],
     "`indent` is replaced by `option=orjson.OPT_INDENT_2`"),
    ("head", "How many levels deep may the output of default recurse before JSONEncodeError is "
     "raised?", ["254"], "more than 254 levels deep"),
    ("head", "Which script reproduces the OPT_INDENT_2 benchmarks?", ["pyindent"],
     "using the `pyindent` script"),
    ("head", "Which script reproduces the OPT_NON_STR_KEYS benchmark?", ["pynonstr"],
     "using the `pynonstr` script"),
    ("head", "Which option serializes a UTC timezone as Z instead of +00:00?", ["OPT_UTC_Z"],
     "OPT_UTC_Z\n\nSerialize a UTC timezone"),
    # tail: after token 8,192 (past SmolLM2's context)
    ("tail", "Which flag names the contiguous C array layout that numpy arrays must have?",
     ["C_CONTIGUOUS"], "contiguous C array (`C_CONTIGUOUS`)"),
    ("tail", "Through which interface does orjson read numpy.ndarray?", ["PyArrayInterface"],
     "`PyArrayInterface`"),
    ("tail", "To which RFC format does orjson serialize uuid.UUID instances?", ["RFC 4122"],
     "RFC 4122 format"),
    ("tail", "Which list of strings is orjson tested not to crash against?",
     ["Big List of Naughty Strings", "Naughty Strings"], "Big List of Naughty Strings"),
    ("tail", "How many JSON fixtures does the correctness comparison use?", ["342"],
     "a combined 342 JSON fixtures"),
    ("tail", "Which web server is used in orjson's integration tests?", ["gunicorn"],
     "web servers (gunicorn"),
    ("tail", "In which container were the performance results measured?", ["Fedora 42"],
     "in a Fedora 42 container"),
    ("tail", "Which library may be appropriate for NDJSON or JSONL?", ["orjsonl"],
     "No. orjsonl may be appropriate."),
    ("tail", "Which Rust version, at least, is required to package orjson?", ["Rust 1.95", "1.95"],
     "at least Rust 1.95"),
    ("tail", "Which build tool is used to package orjson?", ["maturin"], "the maturin build tool"),
]

# needle keys: <adjective>-<noun>, drawn with SEED
NEEDLE_ADJECTIVES = (
    "amber", "brisk", "copper", "dusky", "elder", "fabled", "gilded", "hollow", "ivory",
    "jagged", "kindly", "lunar", "mellow", "nimble", "oaken", "placid", "quiet", "russet",
    "silver", "tawny", "umber", "velvet", "woolly", "zesty",
)
NEEDLE_NOUNS = (
    "anchor", "bramble", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island",
    "juniper", "kettle", "lantern", "meadow", "nutmeg", "orchard", "pebble", "quarry", "raven",
    "saddle", "thistle", "upland", "violin", "walnut", "yarrow",
)
NEEDLE_SENTENCE = "The special magic number for {key} is {number}."
NEEDLE_QUESTION = "What is the special magic number for {key} mentioned in the text?"


# --------------------------------------------------------------------------
# Tokens (for the checks, and for the needles' depths)
# --------------------------------------------------------------------------

_TOKENIZER: Any = None


def _tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        try:
            from cart.models import load_tokenizer, resolve_model

            _TOKENIZER = load_tokenizer(resolve_model(None, None))
        except Exception as e:  # noqa: BLE001 -- any failure becomes one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RealTextError(f"cannot load cart's SmolLM2 tokenizer: {first}") from None
    return _TOKENIZER


class Tokens:
    """Token count and char-offset -> token-index lookup for one text."""

    def __init__(self, text: str, tok: Any):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        self.starts = [a for a, _ in enc["offset_mapping"]]
        self.ends = [b for _, b in enc["offset_mapping"]]
        self.n = len(self.starts)

    def index(self, char: int) -> int:
        """Index of the token holding character ``char``."""
        return max(0, bisect.bisect_right(self.starts, char) - 1)

    def char_at(self, token: int) -> int:
        """First character of token ``token`` (len of text past the end)."""
        return self.starts[token] if token < self.n else (self.ends[-1] if self.n else 0)


# --------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------

_PUNCT = str.maketrans("", "", string.punctuation)


def _normalized(text: str) -> str:  # as cart's ``contains`` metric normalizes answers
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text.lower().translate(_PUNCT)).split())


def _record(qid: str, question: str, answers: list[str], **extra: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "id": qid, "question": question, "answers": answers,
            "metric": "contains", **extra}


def _locate(name: str, text: str, qid: str, answers: list[str], evidence: str) -> int:
    """Char offset of the reference answer inside its (unique) evidence span."""
    for a in answers:
        if not _normalized(a):
            raise RealTextError(f"{name}/{qid}: answer {a!r} is empty once normalized")
        if a not in text:
            raise RealTextError(f"{name}/{qid}: answer {a!r} is not verbatim in the corpus")
    n = text.count(evidence)
    if n != 1:
        raise RealTextError(f"{name}/{qid}: evidence {evidence!r} occurs {n} times in the corpus "
                            f"(want once)")
    if answers[0] not in evidence:
        raise RealTextError(f"{name}/{qid}: evidence {evidence!r} lacks answer {answers[0]!r}")
    return text.index(evidence) + evidence.index(answers[0])


def _check_range(name: str, n: int, bounds: tuple[int, int]) -> None:
    if not bounds[0] <= n <= bounds[1]:
        raise RealTextError(f"{name}: {n} tokens, outside {bounds[0]:,}-{bounds[1]:,}")


def build_real(tok: Any) -> tuple[str, list[dict[str, Any]]]:
    text = real_text()
    toks = Tokens(text, tok)
    _check_range("real", toks.n, REAL_TOKENS)
    records, thirds = [], [0, 0, 0]
    for i, (question, answers, evidence) in enumerate(REAL_QUESTIONS, 1):
        qid = f"real-{i:03d}"
        pos = _locate("real", text, qid, answers, evidence)
        thirds[min(2, 3 * toks.index(pos) // toks.n)] += 1
        records.append(_record(qid, question, answers))
    if min(thirds) < MIN_PER_THIRD:
        raise RealTextError(f"real: questions per third of the text (start/middle/end) are "
                            f"{thirds}; want at least {MIN_PER_THIRD} each")
    return text, records


def needle_facts(text: str) -> list[tuple[str, str]]:
    """(key, 7-digit number) pairs, drawn with SEED, none of whose words/numbers are in ``text``."""
    rng = random.Random(SEED)
    adjectives = rng.sample(NEEDLE_ADJECTIVES, len(NEEDLE_DEPTHS))
    nouns = rng.sample(NEEDLE_NOUNS, len(NEEDLE_DEPTHS))
    numbers = rng.sample(range(1_000_000, 10_000_000), len(NEEDLE_DEPTHS))
    words = set(re.findall(r"[a-z]+", text.lower()))
    facts = []
    for adj, noun, number in zip(adjectives, nouns, numbers):
        if adj in words or noun in words or str(number) in text:
            raise RealTextError(f"needle: key {adj}-{noun} or number {number} already occurs in "
                                f"the text; change SEED or the word lists")
        facts.append((f"{adj}-{noun}", str(number)))
    return facts


def build_needle(tok: Any, real: str) -> tuple[str, list[dict[str, Any]]]:
    facts = needle_facts(real)
    # Where a needle may go: at a paragraph break (it becomes its own paragraph) or at a line
    # break after a sentence (it becomes the next line of the paragraph); the nearest one to
    # each target depth, counted in SmolLM2 tokens of the text without needles (as RULER does).
    # Never inside a fenced code block.
    bounds = {m.start(): "\n\n" for m in re.finditer(r"\n\n", real)}
    bounds.update({m.start(): "\n" for m in re.finditer(r"(?<=[.!?])\n(?!\n)", real)})
    for code in re.finditer(r"(?ms)^```.*?^```", real):
        bounds = {b: sep for b, sep in bounds.items() if not code.start() <= b < code.end()}
    haystack = Tokens(real, tok)
    chosen: list[int] = []
    for depth in NEEDLE_DEPTHS:
        target = haystack.char_at(round(depth * haystack.n))
        free = [b for b in bounds if b not in chosen]
        chosen.append(min(free, key=lambda b: (abs(b - target), b)))
    if chosen != sorted(chosen):
        raise RealTextError("needle: too few sentence breaks to keep the needles in order")
    sentences = [NEEDLE_SENTENCE.format(key=k, number=n) for k, n in facts]
    text = real
    for at, sentence in sorted(zip(chosen, sentences), reverse=True):
        text = text[:at] + bounds[at] + sentence + text[at:]
    toks = Tokens(text, tok)
    _check_range("needle", toks.n, NEEDLE_TOKENS)
    records = []
    for i, ((key, number), sentence, depth) in enumerate(zip(facts, sentences, NEEDLE_DEPTHS), 1):
        qid = f"needle-{i:03d}"
        if text.count(sentence) != 1 or text.count(number) != 1:
            raise RealTextError(f"needle/{qid}: needle {sentence!r} is not in the text exactly once")
        actual = toks.index(text.index(sentence)) / toks.n
        if abs(actual - depth) > NEEDLE_TOLERANCE:
            raise RealTextError(f"needle/{qid}: needle at token depth {actual:.2f}, target {depth} "
                                f"(tolerance {NEEDLE_TOLERANCE})")
        _locate("needle", text, qid, [number], sentence)
        records.append(_record(qid, NEEDLE_QUESTION.format(key=key), [number], depth=depth))
    return text, records


def build_long(tok: Any) -> tuple[str, list[dict[str, Any]]]:
    text = long_text()
    toks = Tokens(text, tok)
    _check_range("long", toks.n, LONG_TOKENS)
    head_text = text[:toks.char_at(CONTEXT)].lower()
    records, counts = [], {"head": 0, "tail": 0}
    for i, (part, question, answers, evidence) in enumerate(LONG_QUESTIONS, 1):
        qid = f"long-{i:03d}"
        pos = _locate("long", text, qid, answers, evidence)
        first, last = toks.index(pos), toks.index(pos + len(answers[0]) - 1)
        if part == "head" and last >= HEAD_LIMIT:
            raise RealTextError(f"long/{qid}: head answer {answers[0]!r} ends at token {last}, "
                                f"not before {HEAD_LIMIT}")
        if part == "tail":
            if first < CONTEXT:
                raise RealTextError(f"long/{qid}: tail answer {answers[0]!r} starts at token "
                                    f"{first}, before {CONTEXT}")
            for a in answers:
                if a.lower() in head_text:
                    raise RealTextError(f"long/{qid}: tail answer {a!r} also occurs in the first "
                                        f"{CONTEXT} tokens")
        if part not in counts:
            raise RealTextError(f"long/{qid}: part must be head or tail, got {part!r}")
        counts[part] += 1
        records.append(_record(qid, question, answers, part=part))
    if counts["head"] < MIN_HEAD or counts["tail"] < MIN_TAIL:
        raise RealTextError(f"long: {counts['head']} head and {counts['tail']} tail questions; "
                            f"want at least {MIN_HEAD} and {MIN_TAIL}")
    return text, records


def _source_of(name: str) -> Source:
    return SOURCES["orjson"] if name == "long" else SOURCES["sacrebleu"]


def build(out_dir: Path, only: list[str] | None = None, *, tokenizer: Any = None) -> dict[str, Path]:
    """Check, then write ``out_dir/<name>/{corpus.md,questions.jsonl}`` for each corpus in
    ``only`` (default: all of ``CORPORA``); returns ``{name: out_dir/name}``. Raises
    ``RealTextError`` (nothing written) if a source package or a check fails. ``tokenizer``:
    a SmolLM2 tokenizer already loaded (default: cart's)."""
    names = list(CORPORA) if not only else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        raise RealTextError(f"unknown corpus {unknown[0]!r} (known: {', '.join(CORPORA)})")
    tok = tokenizer if tokenizer is not None else _tokenizer()
    built: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    if "real" in names or "needle" in names:
        real = build_real(tok)
        if "real" in names:
            built["real"] = real
        if "needle" in names:
            built["needle"] = build_needle(tok, real[0])
    if "long" in names:
        built["long"] = build_long(tok)
    out: dict[str, Path] = {}
    for name in names:  # every check passed: now write
        text, records = built[name]
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "corpus.md").write_text(text, encoding="utf-8", newline="\n")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (folder / "questions.jsonl").write_text(lines, encoding="utf-8", newline="\n")
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        print(f"{name}: {_source_of(name).pin}, {n:,} tokens, {len(records)} questions -> {folder}",
              file=sys.stderr)
        out[name] = folder
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="write OUT_DIR/<name>/{corpus.md,questions.jsonl}")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"build only this corpus ({', '.join(CORPORA)}); repeatable or "
                             f"comma-separated")
    args = parser.parse_args(argv)
    only = [n.strip() for o in args.only or [] for n in o.split(",") if n.strip()] or None
    try:
        build(args.out_dir, only)
    except RealTextError as e:
        print(f"realtext: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
