"""Fuzzing the readers of every artifact cart reads (issue 15, item 14): chunk records, self-study
conversations (and the partial files synth resumes), question sets and cartridge files.

The property: any input gives a result or a ``CartError`` whose message is one line naming the
file, never another exception, and the input file is left as it was. What a reader accepts, the
code after it can use: the chunks' fields, the conversations' batches (finite teacher
probabilities), the questions' prompts, a cartridge's tensors (finite).

Inputs are valid records changed anywhere (each field kept, replaced by any JSON value or
dropped), any JSON, and any bytes; cartridge files are a valid file with its header changed,
its bytes flipped, or any bytes. Every test tries at least 2,000 inputs, in-process, with no
model.
"""

from __future__ import annotations

import copy
import json
import struct

import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cart.io import CartError, Console

# derandomize: CI tries the same 2,000 inputs each run (a landing never hangs on luck)
FUZZ = settings(max_examples=2000, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
VOCAB = 1000  # the vocabulary the conversations are checked against (as distill does)

_DROP = object()
_EDGE = st.sampled_from([0, 1, -1, 2**63 - 1, -2**63, 2**64 - 1, -1000.0, 1e308, -1e308, 0.5,
                         "", "0", "x", " ", True, False, None, [], {}, [0], [[0]], {"a": 1}])
_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12) | _EDGE)
ANY_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)


def _paths(value, prefix=()):
    """Every place in a JSON value, as a tuple of keys and indices."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from _paths(inner, prefix + (key,))


def _apply(base, changes):
    record = copy.deepcopy(base)
    for path, new in changes:
        if not path:
            record = None if new is _DROP else new
            continue
        try:
            parent = record
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict) != isinstance(path[-1], str):
                continue  # an earlier change replaced the container
            if new is _DROP:
                del parent[path[-1]]
            else:
                parent[path[-1]] = new
        except (KeyError, IndexError, TypeError):  # the same
            pass
    return record


def like(base):
    """Records like ``base`` with one to three places in it replaced by any JSON value or
    dropped: mostly valid records, so the checks deep in a reader are reached too."""
    change = st.tuples(st.sampled_from(list(_paths(base))), st.one_of(ANY_JSON, st.just(_DROP)))
    return st.lists(change, min_size=1, max_size=3).map(lambda changes: _apply(base, changes))


def jsonl_files(*records):
    """JSONL bytes: lines that are the records changed, unchanged, any JSON, blank or any
    bytes."""
    line = st.one_of(*(like(r).map(orjson.dumps) for r in records),
                     st.sampled_from([orjson.dumps(r) for r in records]),
                     ANY_JSON.map(orjson.dumps), st.just(b""), st.binary(max_size=40))
    return st.lists(line, max_size=4).map(lambda lines: b"".join(x + b"\n" for x in lines))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def one_line_naming(error: CartError, name: str) -> None:
    text = str(error)
    assert text and "\n" not in text and name in text, text


def read_with(path, data: bytes, read):
    """``read(path)`` on a file holding ``data``: its result, or None for a CartError (checked);
    any other exception fails the test. The file must be unchanged afterwards."""
    path.write_bytes(data)
    try:
        result = read(path)
    except CartError as e:
        one_line_naming(e, str(path))
        result = None
    assert path.read_bytes() == data
    return result


# -- chunk records (cart synth's input) ----------------------------------------------------------
CHUNK = {"schema": "cart.chunk/1", "id": "chunk-1", "text": "Ship 1 docks at bay 1.",
         "n_tokens": 7, "start": 0, "end": 7,
         "sources": [{"path": "a.txt", "start": 0, "end": 7, "char_start": 0, "char_end": 22}],
         "description": None, "corpus": {"hash": "9fb225b61d3558b3", "n_tokens": 7, "n_documents": 1},
         "tokenizer": {"model": "m", "hash": "5423e85c403bab28"},
         "config": {"mode": "random", "num_chunks": 1, "min_tokens": 1, "max_tokens": 7,
                    "overlap": 0, "seed": 0}}


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


@FUZZ
@given(data=jsonl_files(CHUNK))
def test_chunk_reader(workdir, data):
    from cart.chat import system_prompt
    from cart.synth import SynthConfig, chunk_paths, chunk_tokenizer_hashes, corpus_head, load_chunks

    path = workdir / "chunks.jsonl"
    loaded = read_with(path, data, lambda p: load_chunks([str(p)], SynthConfig(), None,
                                                         Console(True)))
    if loaded is None:
        return
    chunks, _ = loaded
    chunk_tokenizer_hashes(chunks)
    corpus_head(chunks, None, _Tokenizer())
    for c in chunks:  # what synth reads of each chunk
        assert all(isinstance(p, str) for p in chunk_paths(c))
        assert isinstance(system_prompt(c), str)
        json.dumps(c.get("corpus"))


# -- conversations (cart distill's input) and synth's partial files -------------------------------
CONVO = {"schema": "cart.convo/1", "id": "convo-r-000000", "index": 0, "run": "r",
         "chunk": {"id": "chunk-1", "n_tokens": 7, "paths": ["a.txt"]},
         "seed_prompt": {"type": "question", "text": "Ask."},
         "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
         "token_ids": [1, 20, 30, 2, 40, 50, 2],
         "targets": {"positions": [4, 5, 6], "ids": [[40, 41], [50], [2]],
                     "logprobs": [[-0.1, -2.5], [-0.01], [-1000.0]]},
         "stats": {"a_tokens": [3], "b_tokens": [2], "b_finished": [True], "looped": [[False, False]]},
         "model": {"id": "m", "config_hash": "7d2f0e91c4a86b35", "tokenizer_hash": "5423e85c403bab28"},
         "corpus": {"hash": "9fb225b61d3558b3", "n_tokens": 7, "n_documents": 1},
         "config": {"num_convos": 1}, "corpus_head": {"ids": [5, 6, 7], "source": "corpus"}}


@FUZZ
@given(data=jsonl_files(CONVO))
def test_conversation_reader(workdir, data):
    from cart.distill import check_vocabulary, load_conversations, make_batch

    path = workdir / "convos.jsonl"
    convos = read_with(path, data, lambda p: load_conversations([str(p)]))
    if convos is None:
        return
    try:
        check_vocabulary(convos, VOCAB)
    except CartError as e:
        one_line_naming(e, "vocabulary")
        return
    batch = make_batch([list(range(len(convos.convos)))], convos.convos, 6, 0, "cpu")
    assert bool(torch.isfinite(batch.cand_probs).all())  # no record makes a NaN target
    json.dumps(convos.corpus)  # goes into the cartridge's metadata


@FUZZ
@given(data=st.tuples(st.sampled_from([b'{"run":"r"}\n', b""]),
                      jsonl_files({"run": "r"}, CONVO, {**CONVO, "index": 1})).map(b"".join))
def test_synth_partial_file_reader(workdir, data):
    """What a resumed synth reads of its own partial file: torn or foreign lines end the part
    kept, another run's file is refused."""
    from cart.io import PartialOutput
    from cart.synth import Planned, _complete, whole_batches

    path = workdir / "out.jsonl.partial"
    batches = [[Planned(0, CHUNK, "question", "Ask."), Planned(1, CHUNK, "question", "Ask.")]]
    done = read_with(path, data, lambda p: whole_batches(
        PartialOutput(p.with_name("out.jsonl"), "r", "another run").earlier, batches))
    if done is not None:
        n, end = done
        assert n in (0, 1) and 0 <= end <= len(data)
    read_with(path, data, lambda p: _complete(p, "r", batches))


# -- question sets (cart eval's input) ------------------------------------------------------------
QUESTIONS = [
    {"schema": "cart.questions/1", "id": "q1", "question": "Who?", "answers": ["Ada", "A"],
     "metric": "contains"},
    {"id": "q2", "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Which?"}],
     "choices": ["x", "y", "z"], "answers": ["B"]},
    {"question": "What?", "answer": "forty two", "metric": "token_f1"},
    {"question": "When?", "answer": ["2091", "in 2091"], "metric": "loglik"},
]


@FUZZ
@given(data=jsonl_files(*QUESTIONS))
def test_question_reader(workdir, data):
    from cart.questions import load_questions, question_messages, reference_answer

    path = workdir / "questions.jsonl"
    questions = read_with(path, data, lambda p: load_questions(str(p)))
    for q in questions or []:  # what eval builds of each question
        msgs = question_messages(q)
        assert msgs[-1]["role"] == "user" and all(isinstance(m["content"], str) for m in msgs)
        assert isinstance(reference_answer(q), str)


# -- cartridge files -------------------------------------------------------------------------------
def _valid_cartridge() -> bytes:
    from cart.cartridge import Cartridge

    gen = torch.Generator().manual_seed(0)

    def t(n):
        return [torch.randn(1, n, 2, generator=gen) for _ in range(2)]

    md = {"base_model": "m", "model_config_hash": "7d2f0e91c4a86b35",
          "tokenizer_hash": "5423e85c403bab28", "corpus_tokens": 40, "init": {"kind": "corpus"}}
    return Cartridge(t(1), t(1), t(2), t(2), metadata=md,
                     biases=[torch.zeros(1, 3), torch.zeros(1, 3)]).to_bytes()


VALID = _valid_cartridge()
(_N,) = struct.unpack("<Q", VALID[:8])
HEADER, BODY = json.loads(VALID[8:8 + _N]), VALID[8 + _N:]


def _pack(header, body: bytes) -> bytes:
    return _pack_raw(json.dumps(header).encode(), body)


def _pack_raw(raw: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + body


def _flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position % len(out)] ^= 1 << bit
    return bytes(out)


CARTRIDGE_FILES = st.one_of(
    st.builds(_pack, like(HEADER), st.one_of(st.just(BODY), st.binary(max_size=2 * len(BODY)))),
    st.builds(_flip, st.just(VALID), st.integers(min_value=0), st.integers(0, 7)),
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
              st.integers(0, 2**64 - 1), st.binary(max_size=64)),
    st.integers(1, 200_000).map(  # deep nesting, in the header or in its metadata
        lambda n: _pack_raw(b'{"__metadata__": ' + b"[" * n + b"]" * n + b"}", b"")),
    st.integers(1, 200_000).map(lambda n: _pack(
        {**HEADER, "__metadata__": {**HEADER["__metadata__"], "init": "[" * n + "]" * n,
                                   "tensor_sha256": HEADER["__metadata__"]["tensor_sha256"]}},
        BODY)),
    st.binary(max_size=300),
)


@FUZZ
@given(data=CARTRIDGE_FILES)
def test_cartridge_header_parser(data):
    from cart.cartridge import Cartridge, read_metadata_bytes

    name = "fuzz.safetensors"
    try:
        read_metadata_bytes(data, name)
        cart = Cartridge.from_bytes(data, name)
    except CartError as e:
        one_line_naming(e, name)
        return
    assert all(bool(torch.isfinite(t).all()) for t in cart.tensors().values())
    cart.kv_bytes()


def test_the_valid_inputs_are_read(workdir):
    """The bases the fuzzing changes are themselves valid (so the changes explore near them)."""
    from cart.cartridge import Cartridge
    from cart.distill import load_conversations
    from cart.questions import load_questions
    from cart.synth import SynthConfig, load_chunks

    def write(name, records):
        path = workdir / name
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
        return str(path)

    assert len(load_chunks([write("c.jsonl", [CHUNK])], SynthConfig(), None, Console(True))[0]) == 1
    assert len(load_conversations([write("v.jsonl", [CONVO])]).convos) == 1
    assert len(load_questions(write("q.jsonl", QUESTIONS))) == 4
    assert Cartridge.from_bytes(VALID, "valid").num_tokens == 3
