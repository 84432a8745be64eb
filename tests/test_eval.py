"""cart eval on the tiny model, through the CLI: every method side by side, outputs (JSONL,
summary, table, plot), batching, resume, and clear errors for bad question files."""

import json
import os
import re
import signal
import subprocess
import time

import orjson
import pytest
import torch
from conftest import CART, one_line_error

from cart.kvcache import cartridge_from_tokens
from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

CORPUS = ("Orbital freight ships dock at bay seven. Captain Ilsa Voss founded the cooperative in "
          "2091. Meridian Falls has four bridges and a tram line. The answer is forty two. ") * 3


def q(id, question, answers, **extra):
    return {"schema": "cart.questions/1", "id": id, "question": question, "answers": answers, **extra}


QUESTIONS = [
    q("q1", "Who founded the cooperative?", ["Ilsa Voss", "Voss"]),
    q("q2", "Where do ships dock?", ["bay seven"], metric="exact"),
    q("q3", "How many bridges?", ["four bridges"], metric="token_f1"),
    q("q4", "Which of these is a place?", ["B"], choices=["forty two", "Meridian Falls", "2091"]),
    q("q5", "Say the answer.", ["The answer is forty two."], metric="chrf"),
    q("q6", "What is the answer?", ["forty two"], metric="loglik"),
    {"schema": "cart.questions/1", "id": "q7", "answers": ["2091"],
     "messages": [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "When was it founded?"}]},
]


def write_jsonl(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    ref = resolve_model(str(tiny_model))
    model, tok, ident = load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)
    corpus = d / "corpus.md"
    corpus.write_text(CORPUS)
    ids = tok(CORPUS, add_special_tokens=False).input_ids
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash, "corpus_tokens": len(ids)}
    for name, start, p in (("small", 0, 8), ("big", 3, 20)):
        cartridge_from_tokens(model, torch.tensor(ids[start:start + p]), metadata=md).save(d / f"{name}.safetensors")
    return {"dir": d, "corpus": corpus, "questions": write_jsonl(d / "q.jsonl", QUESTIONS),
            "model": tiny_model, "corpus_tokens": len(ids)}


def test_all_methods_side_by_side(files, run_cart_subprocess, tmp_path):
    """End to end (the real executable): a fresh process, matplotlib's first import included,
    writes nothing on stderr."""
    d = files["dir"]
    summary, plot = tmp_path / "s.json", tmp_path / "p.png"
    proc = run_cart_subprocess("eval", files["questions"], "-m", files["model"], "--no-context",
                               "--icl", files["corpus"], "--truncate", 10, "--truncate", 20,
                               "-c", d / "small.safetensors", "-c", d / "big.safetensors",
                               "--max-new-tokens", 6, "--batch-size", 3, "--summary", summary,
                               "--plot", plot)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""  # not a terminal: no table unless --table
    rows = [orjson.loads(line) for line in proc.stdout.splitlines()]
    methods = ["no context", "ICL", "ICL first 10", "ICL first 20", "small", "big"]
    assert [r["method"] for r in rows] == [m for m in methods for _ in QUESTIONS]
    assert [r["id"] for r in rows[:7]] == [x["id"] for x in QUESTIONS]
    for r in rows:
        assert r["schema"] == "cart.result/1"
        assert r["answer_nll"] > 0 and r["answer_tokens"] > 0
        if r["id"] == "q6":  # loglik: no generation
            assert r["prediction"] is None and r["score"] is None and r["metric"] == "loglik"
        else:
            assert isinstance(r["prediction"], str) and 0.0 <= r["score"] <= 1.0
            assert 1 <= r["generated_tokens"] <= 6
    assert {r["metric"] for r in rows} == {"contains", "exact", "token_f1", "multiple_choice",
                                           "chrf", "loglik"}
    report = json.loads(summary.read_text())
    per = {m["method"]: m for m in report["methods"]}
    assert list(per) == methods
    bpt = 2 * 2 * 2 * 16 * 4  # layers x K,V x kv heads x head dim x fp32
    assert report["kv_bytes_per_token"] == bpt
    icl = per["ICL"]["kv_tokens"]
    assert icl > files["corpus_tokens"]  # the corpus plus the system turn's template tokens
    assert per["no context"]["kv_tokens"] == 0 and per["no context"]["compression_vs_icl"] is None
    assert per["small"]["kv_tokens"] == 8 and per["big"]["kv_tokens"] == 20
    assert per["ICL first 10"]["kv_tokens"] < per["ICL first 20"]["kv_tokens"] < icl
    for m in per.values():
        assert m["kv_bytes"] == m["kv_tokens"] * bpt
        assert m["questions"] == 7 and m["scored"] == 6
        if m["kv_tokens"]:
            assert m["compression_vs_icl"] == round(icl / m["kv_tokens"], 2)
        mine = [r for r in rows if r["method"] == m["method"]]
        assert m["score"] == pytest.approx(sum(r["score"] for r in mine if r["score"] is not None) / 6)
        n = sum(r["answer_tokens"] for r in mine)
        assert m["answer_nll"] == pytest.approx(sum(r["answer_nll"] * r["answer_tokens"] for r in mine) / n)
        assert m["answer_perplexity"] == pytest.approx(2.718281828 ** m["answer_nll"], rel=1e-6)
        assert m["tokens_per_s"] > 0 and set(m["by_metric"]) == {"contains", "exact", "token_f1",
                                                                 "multiple_choice", "chrf"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    none, icl_nll = per["no context"]["answer_nll"], per["ICL"]["answer_nll"]
    for m in per.values():  # this run has both ends of the gap
        expected = round((none - m["answer_nll"]) / (none - icl_nll), 4) if none > icl_nll else None
        assert m["nll_gap_closed"] == expected


def test_the_gap_closed_is_measured_between_no_context_and_icl():
    from cart.eval import add_gap_closed, format_table

    def method(name, kind, nll):
        return {"method": name, "kind": kind, "answer_nll": nll, "kv_tokens": 0, "kv_bytes": 0,
                "compression_vs_icl": None, "score": None, "scored": 0, "correct": 0,
                "answer_perplexity": 1.0, "tokens_per_s": None}

    rows = [method("no context", "no_context", 6.0), method("ICL", "icl", 2.0),
            method("ICL first 8", "truncated_icl", 5.0), method("c", "cartridge", 3.0),
            method("better", "cartridge", 1.0)]
    add_gap_closed(rows)
    assert [r["nll_gap_closed"] for r in rows] == [0.0, 1.0, 0.25, 0.75, 1.25]
    table = format_table(rows).splitlines()
    assert table[0].split()[-4:] == ["NLL/token", "gap", "ppl", "tok/s"]
    assert " 75% " in table[5] and table[-1].startswith("gap: the fraction of the no-context")
    for kept in (rows[:1], rows[1:], [method("ICL", "icl", 7.0), *rows[:1]]):
        add_gap_closed(kept)  # an end missing, or ICL no better than no context: no gap
        assert all(r["nll_gap_closed"] is None for r in kept)
        assert not format_table(kept).splitlines()[-1].startswith("gap:")


def test_batching_changes_nothing(files, run_cart):
    args = ["eval", files["questions"], "-m", files["model"], "--icl", files["corpus"],
            "-c", files["dir"] / "big.safetensors", "--max-new-tokens", 8]
    one = [orjson.loads(x) for x in run_cart(*args, "--batch-size", 1).stdout.splitlines()]
    many = [orjson.loads(x) for x in run_cart(*args, "--batch-size", 7).stdout.splitlines()]
    assert len(one) == len(many) == 14
    for a, b in zip(one, many):
        assert a["prediction"] == b["prediction"]
        assert a["answer_nll"] == pytest.approx(b["answer_nll"], abs=1e-4)


def test_table_and_stdin(files, run_cart):
    proc = run_cart("eval", "-", "-m", files["model"], "--no-context", "-c",
                    files["dir"] / "small.safetensors", "--max-new-tokens", 4, "--table",
                    input=files["questions"].read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stderr.decode().splitlines()
    assert lines[0].split() == ["method", "KV", "tokens", "KV", "memory", "vs", "ICL", "score",
                                "NLL/token", "gap", "ppl", "tok/s"]
    assert lines[2].startswith("no context ") and lines[3].startswith("small ")
    assert " 8 " in lines[3] and "4.0 KiB" in lines[3]  # 8 tokens x 512 bytes
    assert len(proc.stdout.splitlines()) == 14


def test_resume_after_kill(files, tmp_path, cart_home, run_cart):
    """SIGKILL mid-run, rerun the same command: the finished batches are kept, the output equals
    an uninterrupted run's. (Only the killed run needs a process of its own.)"""
    many = [q(f"m{i}", f"Question number {i}: who founded it?", ["Ilsa Voss"]) for i in range(30)]
    qf = write_jsonl(tmp_path / "many.jsonl", many)
    env = {**os.environ, "CART_HOME": str(cart_home)}
    base = [str(CART), "eval", str(qf), "-m", str(files["model"]), "--no-context", "--icl",
            str(files["corpus"]), "--max-new-tokens", 24, "--batch-size", 1, "--no-stop-loops"]
    base = [str(x) for x in base]
    ref = run_cart(*base[1:], "-o", tmp_path / "ref.jsonl")
    assert ref.returncode == 0, ref.stderr.decode()
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen(base + ["-o", str(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial.exists() and partial.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not out.exists()
    done = partial.read_bytes().count(b"\n") - 1
    assert 5 <= done < 60
    again = run_cart(*base[1:], "-o", out)
    assert again.returncode == 0, again.stderr.decode()
    assert not partial.exists()
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    # a partial file of other settings is refused, not mixed in
    partial.write_bytes(b'{"run": "0123456789abcdef"}\n')
    err = run_cart(*base[1:], "-o", out)
    assert err.returncode == 1
    assert err.stderr.decode().strip() == (f"cart: error: {partial}: partial results of another run "
                                           f"(other questions, methods or settings); delete it to "
                                           f"start over")


BAD = [
    ({"schema": "cart.chunk/1", "id": "x", "question": "?", "answers": ["a"]},
     "q.jsonl:1: expected a cart.questions/1 record, got cart.chunk/1"),
    ({"schema": "cart.questions/1", "id": 7, "question": "?", "answers": ["a"]},
     "q.jsonl:1: field 'id' must be str, got int"),
    ({"schema": "cart.questions/1", "id": "x", "answers": ["a"]},
     "q.jsonl:1: give exactly one of the fields 'question' and 'messages'"),
    ({"schema": "cart.questions/1", "id": "x", "question": "?"}, "q.jsonl:1: missing field 'answers'"),
    ({"schema": "cart.questions/1", "id": "x", "question": "?", "answers": "a"},
     "q.jsonl:1: field 'answers' must be list, got str"),
    ({"schema": "cart.questions/1", "id": "x", "question": "?", "answers": []},
     "q.jsonl:1: field 'answers' must be a non-empty list of non-empty strings"),
    ({"schema": "cart.questions/1", "id": "x", "question": "?", "answers": ["a"], "metric": "bleu"},
     "q.jsonl:1: unknown metric 'bleu' (known: chrf, contains, exact, loglik, multiple_choice, token_f1)"),
    ({"schema": "cart.questions/1", "id": "x", "question": "?", "answers": ["E"], "choices": ["a", "b"]},
     "q.jsonl:1: field 'answers' must hold the letter of the correct option (A-B), got 'E'"),
    ({"schema": "cart.questions/1", "id": "x", "messages": [{"role": "user", "content": "?"},
                                                            {"role": "assistant", "content": "!"}],
      "answers": ["a"]}, "q.jsonl:1: the last of 'messages' must be the user's turn"),
    ({"schema": "cart.questions/2", "id": "x", "question": "?", "answers": ["a"]},
     "q.jsonl:1: unsupported schema version cart.questions/2 (this cart reads cart.questions/1; "
     "upgrade cart or regenerate the file)"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_question_files(files, run_cart, tmp_path, record, message):
    path = write_jsonl(tmp_path / "q.jsonl", [record])
    err = one_line_error(run_cart("eval", path, "-m", files["model"], "--no-context", cwd=tmp_path))
    assert err == "cart: error: " + message.replace("q.jsonl", str(path))


def test_more_bad_inputs(files, run_cart, tmp_path):
    m = files["model"]
    qf = files["questions"]
    dup = write_jsonl(tmp_path / "dup.jsonl", [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]])
    assert one_line_error(run_cart("eval", dup, "-m", m, "--no-context")) == (
        f"cart: error: {dup}:3: duplicate id 'q1' (first on line 1)")
    (tmp_path / "bad.jsonl").write_bytes(b'{"schema": "cart.questions/1", "id": \n')
    assert one_line_error(run_cart("eval", tmp_path / "bad.jsonl", "-m", m, "--no-context")).startswith(
        f"cart: error: {tmp_path / 'bad.jsonl'}:1: invalid JSON")
    (tmp_path / "empty.jsonl").write_bytes(b"\n")
    assert one_line_error(run_cart("eval", tmp_path / "empty.jsonl", "-m", m, "--no-context")) == (
        f"cart: error: {tmp_path / 'empty.jsonl'}: no questions")
    assert one_line_error(run_cart("eval", qf, "-m", m)) == (
        "cart: error: nothing to evaluate: give --cartridge FILE, --icl CORPUS or --no-context")
    assert one_line_error(run_cart("eval", qf, "-m", m, "--truncate", 5)) == (
        "cart: error: --truncate N needs the corpus: give --icl CORPUS")
    assert one_line_error(run_cart("eval", qf, "-m", m, "--icl", files["corpus"], "--truncate", 100000)) == (
        f"cart: error: --truncate 100000: the corpus ({files['corpus']}) has only "
        f"{files['corpus_tokens']} tokens")
    assert one_line_error(run_cart("eval", qf, "-m", m, "-c", tmp_path / "none.safetensors")) == (
        f"cart: error: {tmp_path / 'none.safetensors'}: no such cartridge file")
    assert one_line_error(run_cart("eval", qf, "-m", m, "--icl", tmp_path / "none.md")) == (
        f"cart: error: {tmp_path / 'none.md'}: no such file or directory")
    assert one_line_error(run_cart("eval", qf, "-m", m, "--no-context", "--max-new-tokens", 0)) == (
        "cart: error: --max-new-tokens must be >= 1, got 0")
    # a corpus longer than the model's context (4096 positions): refused, with the way out
    big = tmp_path / "big.md"
    big.write_text(CORPUS * 40)
    err = one_line_error(run_cart("eval", qf, "-m", m, "--icl", big))
    assert err.startswith(f"cart: error: {big}: ICL needs ") and err.endswith(
        "more than the model's 4096; use --truncate N for the corpus's first N tokens")


def test_cartridge_of_another_model_is_refused(files, other_tiny_model, run_cart):
    err = one_line_error(run_cart("eval", files["questions"], "-m", other_tiny_model, "-c",
                                  files["dir"] / "small.safetensors"))
    assert err.startswith(f"cart: error: {files['dir'] / 'small.safetensors'}: trained for model ")


# -- question sets as people have them (issue 15, items 9 and 12) -------------------------------
def test_plain_question_sets_need_no_schema_or_id(files, run_cart, tmp_path):
    """{"question": ..., "answer": ...}, as most public QA sets are: read as cart.questions/1,
    each question named after its line."""
    path = tmp_path / "plain.jsonl"
    path.write_text('{"question": "Who founded the cooperative?", "answer": "Ilsa Voss"}\n'
                    '{"question": "Where do ships dock?", "answer": ["bay seven", "seven"]}\n'
                    '{"schema": "cart.questions/1", "id": "q3", "question": "How many bridges?", '
                    '"answers": ["four"]}\n')
    proc = run_cart("eval", path, "-m", files["model"], "--no-context", "--max-new-tokens", 2)
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["line-1", "line-2", "q3"]


@pytest.mark.parametrize("record, message", [
    ({"question": "?", "answer": "a", "answers": ["a"]},
     "q.jsonl:1: give only one of the fields 'answers' and 'answer'"),
    ({"question": "?", "answer": 42}, "q.jsonl:1: field 'answer' must be str/list, got int"),
    ({"question": "?", "answer": [""]},
     "q.jsonl:1: field 'answer' must be a non-empty string or list of non-empty strings"),
    ({"question": "?", "answer": " "},
     "q.jsonl:1: field 'answer' must be a non-empty string or list of non-empty strings"),
    ({"question": "?"}, "q.jsonl:1: missing field 'answers'"),
    ({"schema": "cart.questions/2", "question": "?", "answer": "a"},
     "q.jsonl:1: unsupported schema version cart.questions/2 (this cart reads cart.questions/1; "
     "upgrade cart or regenerate the file)"),
    ({"schema": 1, "question": "?", "answer": "a"},
     "q.jsonl:1: field 'schema' is 1, expected cart.questions/1"),
    ({"question": "?", "answer": "a" * 100_001},
     "q.jsonl:1: field 'answer' is 100001 characters long, more than 100000"),
    ({"messages": [{"role": "user", "content": "?" * 100_001}], "answer": "a"},
     "q.jsonl:1: field 'messages[0].content' is 100001 characters long, more than 100000"),
    ({"question": "?", "answers": ["a", "b" * 100_001]},
     "q.jsonl:1: field 'answers[1]' is 100001 characters long, more than 100000"),
])
def test_question_format_errors(tmp_path, record, message):
    from cart.io import CartError
    from cart.questions import load_questions

    path = write_jsonl(tmp_path / "q.jsonl", [record])
    with pytest.raises(CartError) as e:
        load_questions(str(path))
    assert str(e.value) == message.replace("q.jsonl", str(path))


def test_a_huge_question_fails_fast_at_its_line(files, run_cart, tmp_path):
    """A 30 MB question: refused at once, naming the question file and line (not after
    minutes, naming a cartridge)."""
    path = tmp_path / "q.jsonl"
    path.write_bytes(orjson.dumps(QUESTIONS[0]) + b"\n" +
                     orjson.dumps({"question": "x" * 30_000_000, "answer": "a"}) + b"\n")
    started = time.monotonic()
    err = one_line_error(run_cart("eval", path, "-m", files["model"], "-c",
                                  files["dir"] / "small.safetensors"))
    assert err == (f"cart: error: {path}:2: field 'question' is 30000000 characters long, more "
                   "than 100000")
    assert time.monotonic() - started < 60


def test_a_question_longer_than_the_context_is_named(files, run_cart, tmp_path):
    """A question under the size cap but longer than the model's context: the error names the
    question file and the question, not the cartridge it was asked of."""
    path = tmp_path / "q.jsonl"
    path.write_bytes(orjson.dumps(QUESTIONS[0]) + b"\n" +
                     orjson.dumps({"id": "long", "question": "word " * 5000, "answer": "a"}) + b"\n")
    err = one_line_error(run_cart("eval", path, "-m", files["model"], "-c",
                                  files["dir"] / "small.safetensors"))
    assert re.fullmatch(rf"cart: error: {re.escape(str(path))}: question long needs \d+ tokens of "
                        r"context \(question and 64 new tokens\), more than the model's 4096", err), err


def test_icl_reads_a_corpus_as_cart_chunk_does(files, run_cart, tmp_path):
    """`--icl DIR` (and -) work as `cart chunk DIR` does: one corpus reader (issue 15, item 13)."""
    m, qf = files["model"], write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    half = len(CORPUS) // 2
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.md").write_text(CORPUS[:half] + "\n")
    (corpus / "sub" / "b.md").write_text(CORPUS[half:])
    (corpus / ".hidden.md").write_text("skipped, as cart chunk skips it")
    (corpus / "blob.bin").write_bytes(b"\0binary")  # skipped with a warning
    base = ("eval", qf, "-m", m, "--max-new-tokens", 2, "-q")
    files_run = run_cart(*base, "--icl", corpus / "a.md", "--icl", corpus / "sub" / "b.md")
    assert files_run.returncode == 0, files_run.stderr.decode()
    dir_run = run_cart(*base, "--icl", corpus)
    assert dir_run.returncode == 0, dir_run.stderr.decode()
    assert dir_run.stdout == files_run.stdout
    stdin_run = run_cart(*base, "--icl", "-", input=(corpus / "a.md").read_bytes())
    assert stdin_run.returncode == 0, stdin_run.stderr.decode()
    assert one_line_error(run_cart("eval", "-", "-m", m, "--icl", "-", input=qf.read_bytes())) == (
        "cart: error: - (stdin) is given more than once; it can be read only once")


def test_output_into_a_fifo_and_over_a_broken_partial(files, run_cart, tmp_path):
    """-o a FIFO is written into (no FILE.partial beside it); a .partial holding a line cart
    did not write (or nothing, as a failed run leaves it) is redone, not an internal error."""
    import stat
    import threading

    m, qf = files["model"], write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    base = ("eval", qf, "-m", m, "--no-context", "--max-new-tokens", 2, "-q")
    ref = run_cart(*base)
    assert ref.returncode == 0, ref.stderr.decode()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = run_cart(*base, "-o", fifo)
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert got == [ref.stdout] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "q.jsonl"]
    out = tmp_path / "r.jsonl"
    for junk in (b"", b"[1, 2]\n", b"null\n"):
        out.with_name("r.jsonl.partial").write_bytes(junk)
        proc = run_cart(*base, "-o", out)
        assert proc.returncode == 0, proc.stderr.decode()
        assert out.read_bytes() == ref.stdout
