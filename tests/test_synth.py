"""`cart synth` on the tiny model: records, teacher targets, determinism, shards, resume, errors."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import CART, cloze_parts, one_line_error

from cart.chat import SYSTEM_TEMPLATE, render_cartridge_ids, render_ids
from cart.seeds import RECALL_TYPES

CORPUS_TEXT = " ".join(
    f"Ship {i} docks at bay {i % 7} and carries cargo code K{i:03d} for captain Voss." for i in range(60))

SMALL = ("--max-tokens-a", "12", "--max-tokens-b", "16", "--min-tokens", "40", "--max-tokens", "80",
         "--batch-size", "2")


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT)
    return p


def records(data: bytes):
    return [json.loads(x) for x in data.decode().splitlines()]


def test_records_and_teacher_targets_match_a_forward_pass_with_the_chunk(run_cart, tiny_model, corpus, tmp_path):
    chunks = tmp_path / "chunks.jsonl"
    assert run_cart("chunk", corpus, "-n", "3", "--min-tokens", "40", "--max-tokens", "80",
                    "--model", tiny_model, "-o", chunks).returncode == 0
    proc = run_cart("synth", chunks, "-n", "4", "--seed", "0", *SMALL[:4], "--batch-size", "4",
                    "--temperature-b", "0", "--model", tiny_model)
    assert proc.returncode == 0, proc.stderr.decode()
    recs = records(proc.stdout)
    chunk_text = {json.loads(x)["id"]: json.loads(x)["text"] for x in chunks.read_text().splitlines()}
    assert [r["index"] for r in recs] == [0, 1, 2, 3]

    from cart.models import load_model, load_tokenizer, resolve_model
    ref = resolve_model(str(tiny_model))
    model, tok = load_model(ref), load_tokenizer(ref)
    for r in recs:
        assert r["schema"] == "cart.convo/1"
        assert r["seed_prompt"]["type"] in RECALL_TYPES  # the default, recall
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["model"]["tokenizer_hash"] and r["config"]["top_k"] == 20
        t = r["targets"]
        assert len(t["positions"]) == len(t["ids"]) == len(t["logprobs"]) > 0
        # the student's sequence: the conversation as it follows the chunk's system turn
        ids = r["token_ids"]
        student, spans = render_cartridge_ids(tok, [r["messages"][0], {"role": "assistant", "content": ids[
            t["positions"][0]:t["positions"][0] + r["stats"]["b_tokens"][0]]}], False)
        assert student[:len(ids)] == ids[:len(student)]
        # the teacher: B's context, with the chunk in its system prompt, then B's answer
        teacher_prompt, _ = render_ids(tok, [
            {"role": "system", "content": SYSTEM_TEMPLATE.format(chunk=chunk_text[r["chunk"]["id"]])},
            r["messages"][0]], True)
        first = t["positions"][0]
        answer = ids[first:t["positions"][-1] + 1]
        seq = teacher_prompt + answer
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        for j, pos in enumerate(t["positions"]):
            row = logprobs[len(teacher_prompt) + (pos - first) - 1]
            expected = row[t["ids"][j]]
            assert torch.allclose(torch.tensor(t["logprobs"][j]), expected, atol=1e-4), (pos, j)
            # candidates are the top ones, in order, up to the mass cut-off
            assert t["ids"][j][0] == int(row.argmax())
            assert ids[pos] == t["ids"][j][0]  # greedy B: the answer token is the top-1


def test_same_seed_same_output_and_shards_concatenate_to_the_whole(run_cart, tiny_model, corpus):
    args = ("synth", corpus, "-n", "6", "--seed", "3", *SMALL, "--model", tiny_model)
    whole = run_cart(*args)
    assert whole.returncode == 0, whole.stderr.decode()
    assert run_cart(*args).stdout == whole.stdout
    parts = [run_cart(*args, "--shard", f"{i}/3") for i in range(3)]
    assert all(p.returncode == 0 for p in parts)
    assert b"".join(p.stdout for p in parts) == whole.stdout
    assert len({r["index"] for p in parts for r in records(p.stdout)}) == 6
    other = run_cart("synth", corpus, "-n", "6", "--seed", "4", *SMALL, "--model", tiny_model)
    assert other.stdout != whole.stdout


def test_resume_after_kill_9_equals_an_uninterrupted_run(run_cart, tiny_model, corpus, tmp_path, cart_home):
    args = ["synth", str(corpus), "-n", "8", "--seed", "5", *SMALL, "--model", str(tiny_model)]
    reference = run_cart(*args)
    assert reference.returncode == 0
    out = tmp_path / "convos.jsonl"
    partial = tmp_path / "convos.jsonl.partial"
    env = {**os.environ, "CART_HOME": str(cart_home)}
    proc = subprocess.Popen([str(CART), *args, "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once at least one batch is on disk
        if partial.exists() and partial.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial.exists()
    with open(partial, "ab") as f:  # as if killed in the middle of writing a line
        f.write(b'{"schema": "cart.convo/1", "index": ')
    resumed = run_cart(*args, "-o", out)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert out.read_bytes() == reference.stdout
    assert not partial.exists()
    again = run_cart(*args, "-o", out)  # a finished file is left alone
    assert again.returncode == 0 and out.read_bytes() == reference.stdout


def test_chunk_pipe_into_synth(run_cart, tiny_model, corpus):
    chunked = run_cart("chunk", corpus, "-n", "2", "--min-tokens", "40", "--max-tokens", "80",
                       "--model", tiny_model)
    proc = run_cart("synth", "-", "-n", "2", *SMALL[:4], "--model", tiny_model, input=chunked.stdout)
    assert proc.returncode == 0, proc.stderr.decode()
    chunk_ids = {json.loads(x)["id"] for x in chunked.stdout.decode().splitlines()}
    assert {r["chunk"]["id"] for r in records(proc.stdout)} == chunk_ids
    raw = run_cart("synth", "-", "-n", "2", *SMALL, "--model", tiny_model, input=corpus.read_bytes())
    assert raw.returncode == 0 and len(records(raw.stdout)) == 2


def test_chunks_are_used_evenly(run_cart, tiny_model, corpus, tmp_path):
    chunks = tmp_path / "c.jsonl"
    run_cart("chunk", corpus, "-n", "3", "--min-tokens", "40", "--max-tokens", "80", "--model",
             tiny_model, "-o", chunks)
    proc = run_cart("synth", chunks, "-n", "6", *SMALL, "--model", tiny_model)
    used = [r["chunk"]["id"] for r in records(proc.stdout)]
    assert sorted(used[:3]) == sorted(set(used)) and len(set(used)) == 3


@pytest.mark.parametrize("case", ["wrong_schema", "empty_text", "too_long", "bad_shard", "mixed_inputs",
                                  "bad_seed_type"])
def test_bad_inputs(run_cart, tiny_model, corpus, tmp_path, case):
    chunks = tmp_path / "chunks.jsonl"
    good = {"schema": "cart.chunk/1", "id": "chunk-1", "text": "Ship 1 docks at bay 1."}
    args = [chunks]
    if case == "wrong_schema":
        chunks.write_text(json.dumps(good) + "\n" + json.dumps({**good, "schema": "cart.chunk/9"}) + "\n")
        expected = (f"{chunks}:2: unsupported schema version cart.chunk/9 (this cart reads "
                    "cart.chunk/1; upgrade cart or regenerate the file)")
    elif case == "empty_text":
        chunks.write_text(json.dumps({**good, "text": "  "}) + "\n")
        expected = f"{chunks}:1: empty chunk text"
    elif case == "too_long":
        chunks.write_text(json.dumps(good) + "\n")
        args += ["--max-tokens-b", "5000"]
        expected = "exceeds the model's context of 4096 tokens (use smaller chunks or budgets)"
    elif case == "bad_shard":
        chunks.write_text(json.dumps(good) + "\n")
        args += ["--shard", "3/3"]
        expected = "--shard 3/3: need 0 <= i < n"
    elif case == "mixed_inputs":
        chunks.write_text(json.dumps(good) + "\n")
        args += [corpus]
        expected = "give either chunk JSONL files or corpus files, not both"
    elif case == "bad_seed_type":
        chunks.write_text(json.dumps(good) + "\n")
        args += ["--seed-prompts", "riddles"]
        expected = "--seed-prompts: unknown seed-prompt type 'riddles'"
    out = tmp_path / "keep.jsonl"
    out.write_text("keep\n")
    proc = run_cart("synth", *args, "-n", "1", "--model", tiny_model, "-o", out)
    line = one_line_error(proc)
    assert expected in line, line
    assert out.read_text() == "keep\n"


def test_direct_seeds_skip_a_and_the_corpus_head_travels_once(run_cart, tiny_model, corpus):
    """--seed-prompts recall: the seed prompt is the user message itself (A is skipped), and the
    first record carries the corpus's first token ids for cart distill --init corpus."""
    from cart.models import load_tokenizer, resolve_model

    proc = run_cart("synth", corpus, "-n", "4", "--seed-prompts", "recall", *SMALL,
                    "--model", tiny_model)
    assert proc.returncode == 0, proc.stderr.decode()
    recs = records(proc.stdout)
    for r in recs:
        assert r["seed_prompt"]["type"] in RECALL_TYPES
        assert r["messages"][0]["content"] == r["seed_prompt"]["text"]
        assert r["stats"]["a_tokens"] == [0]
        if r["seed_prompt"]["type"] == "cloze":  # its cue is quoted from the corpus
            cue = cloze_parts(r["seed_prompt"]["text"])[1]
            assert len(cue.split()) >= 3 and cue in " ".join(CORPUS_TEXT.split())
    assert "cloze" in {r["seed_prompt"]["type"] for r in recs}
    tok = load_tokenizer(resolve_model(str(tiny_model)))
    head = recs[0]["corpus_head"]
    assert head["source"] == "corpus"
    assert head["ids"] == tok(CORPUS_TEXT, add_special_tokens=False)["input_ids"][:131072]
    assert all("corpus_head" not in r for r in recs[1:])


# -- chunk records with fields of the wrong type, and --top-k past the vocabulary (issue 15) -----
@pytest.mark.parametrize("extra, message", [
    ({"tokenizer": "x"}, "{path}:1: field 'tokenizer' must be dict, got str"),
    ({"sources": "abc"}, "{path}:1: field 'sources' must be list, got str"),
    ({"sources": ["abc"]}, "{path}:1: sources[0] must be an object, got str"),
    ({"sources": [{"path": 3}]}, "{path}:1: sources[0]: field 'path' must be str, got int"),
    ({"tokenizer": {"hash": ["a"]}}, "{path}:1: tokenizer: field 'hash' must be str, got list"),
    ({"start": "0"}, "{path}:1: field 'start' must be int, got str"),
    ({"end": True}, "{path}:1: field 'end' must be int, got bool"),
    ({"description": 5}, "{path}:1: field 'description' must be str, got int"),
])
def test_chunk_fields_of_the_wrong_type_are_named(run_cart, tiny_model, tmp_path, extra, message):
    chunks = tmp_path / "chunks.jsonl"
    good = {"schema": "cart.chunk/1", "id": "chunk-1", "text": "Ship 1 docks at bay 1."}
    chunks.write_text(json.dumps({**good, **extra}) + "\n")
    out = tmp_path / "keep.jsonl"
    out.write_text("keep\n")
    err = one_line_error(run_cart("synth", chunks, "-n", "1", "--model", tiny_model, "-o", out))
    assert err == "cart: error: " + message.format(path=chunks)
    assert out.read_text() == "keep\n"


def test_null_optional_chunk_fields_are_accepted(tmp_path):
    from cart.io import Console
    from cart.synth import SynthConfig, chunk_paths, chunk_tokenizer_hashes, load_chunks

    chunks = tmp_path / "chunks.jsonl"
    chunks.write_text(json.dumps({"schema": "cart.chunk/1", "id": "c", "text": "t", "sources": None,
                                  "tokenizer": None, "description": None}) + "\n")
    got, _ = load_chunks([str(chunks)], SynthConfig(), None, Console(True))
    assert chunk_paths(got[0]) == [] and chunk_tokenizer_hashes(got) == set()


def test_top_k_past_the_vocabulary_is_refused(run_cart, tiny_model, tmp_path):
    from cart.models import load_tokenizer, resolve_model

    chunks = tmp_path / "chunks.jsonl"
    chunks.write_text(json.dumps({"schema": "cart.chunk/1", "id": "c", "text": "Ship 1."}) + "\n")
    out = tmp_path / "out.jsonl"
    err = one_line_error(run_cart("synth", chunks, "-n", "1", "--top-k", "1000000", "--model",
                                  tiny_model, "-o", out))
    vocab = len(load_tokenizer(resolve_model(str(tiny_model))))
    assert err == f"cart: error: --top-k 1000000 is more than the model's vocabulary ({vocab} tokens)"
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_the_corpus_head_of_chunk_files_follows_the_chunks_that_tile_the_corpus():
    """From chunk JSONL, distill's compaction gets every chunk that tiles the corpus from its
    start (a sequential chunking), not just the first one; a gap ends the head."""
    from cart.synth import corpus_head

    def tokenizer(text, add_special_tokens):
        return {"input_ids": [len(w) for w in text.split()]}

    def chunk(i, start, end, text):
        return {"id": f"c{i}", "start": start, "end": end, "text": text}

    tiles = [chunk(2, 5, 9, "ccc dddd"), chunk(0, 0, 3, "a"), chunk(1, 0, 5, "bb bb"),
             chunk(3, 12, 15, "eeeee")]  # 9..12 missing
    assert corpus_head(tiles, None, tokenizer) == {"ids": [2, 2, 3, 4], "source": "chunks c1..c2 (2)"}
    assert corpus_head(tiles[1:2], None, tokenizer) == {"ids": [1], "source": "chunk c0"}
    assert corpus_head(tiles[3:], None, tokenizer) is None
    assert corpus_head(tiles, [7, 8], tokenizer) == {"ids": [7, 8], "source": "corpus"}
