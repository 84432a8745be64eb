"""Hostile and careless command lines (issue 15), through the real ``cart`` entry point: an
output never replaces what it should write into, never clobbers an input, an unwritable
output fails before any work, and non-finite or absurd numbers are refused in one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import orjson
import pytest
from conftest import CART, one_line_error

CORPUS = ("Orbital freight ships dock at bay seven. Captain Ilsa Voss founded the cooperative in "
          "2091. Meridian Falls has four bridges and a tram line. The answer is forty two. ") * 4
CHUNK = ("chunk", "--min-tokens", 8, "--max-tokens", 16, "-n", 2)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.md"
    path.write_text(CORPUS)
    return path


def unchanged(*paths):
    """The bytes of files, to check that a refused run left them alone."""
    return {p: p.read_bytes() for p in paths}


# -- item 2: -o writes into FIFOs, devices, process substitutions and through symlinks ---------
def test_output_into_a_pipe_like_a_process_substitution(tiny_model, corpus, cart_home):
    """``-o >(wc -c)`` hands cart /dev/fd/N, the write end of a pipe: written into, not renamed
    over (that was FileNotFoundError on '/dev/fd/.63....tmp', exit 70)."""
    read_end, write_end = os.pipe()
    got = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(read_end, "rb").read()),
                              daemon=True)
    reader.start()
    env = {**os.environ, "CART_HOME": str(cart_home)}
    proc = subprocess.run([str(CART), *map(str, CHUNK), corpus, "-m", tiny_model,
                           "-o", f"/dev/fd/{write_end}"], pass_fds=(write_end,),
                          capture_output=True, env=env, timeout=600)
    os.close(write_end)
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    records = [orjson.loads(line) for line in got[0].splitlines()]
    assert len(records) == 2 and records[0]["schema"] == "cart.chunk/1"


def test_output_into_a_fifo_keeps_the_fifo(tiny_model, corpus, run_cart, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = run_cart(*CHUNK, corpus, "-m", tiny_model, "-o", fifo)
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # not replaced by a 0600 regular file
    assert got[0].count(b"\n") == 2


def test_output_through_a_symlink_replaces_its_target(tiny_model, corpus, run_cart, tmp_path):
    target, link = tmp_path / "chunks.jsonl", tmp_path / "latest.jsonl"
    target.write_text("old\n")
    target.chmod(0o644)
    link.symlink_to(target.name)
    proc = run_cart(*CHUNK, corpus, "-m", tiny_model, "-o", link)
    assert proc.returncode == 0, proc.stderr.decode()
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_bytes().count(b"\n") == 2
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # the file keeps its permissions


def char_device(path, minor):
    """A private copy of /dev/null (minor 3) or /dev/full (7): a regression may replace it
    without harming the machine's own."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except (PermissionError, AttributeError):
        pytest.skip("needs mknod (root)")
    return path


def test_output_into_character_devices(tiny_model, corpus, run_cart, tmp_path):
    null, full = char_device(tmp_path / "null", 3), char_device(tmp_path / "full", 7)
    proc = run_cart(*CHUNK, corpus, "-m", tiny_model, "-o", null)
    assert proc.returncode == 0, proc.stderr.decode()
    assert stat.S_ISCHR(os.stat(null).st_mode)  # not replaced by a regular file
    err = one_line_error(run_cart(*CHUNK, corpus, "-m", tiny_model, "-o", full))
    assert err == f"cart: error: {full}: cannot write: No space left on device"
    assert stat.S_ISCHR(os.stat(full).st_mode)


# -- item 3: an output that is an input is refused, in every stage ----------------------------
def test_chunk_refuses_to_write_over_its_corpus(tiny_model, corpus, run_cart, tmp_path):
    (tmp_path / "link.md").symlink_to(corpus)
    os.link(corpus, tmp_path / "hard.md")
    before = unchanged(corpus)
    for out in (corpus, tmp_path / "link.md", tmp_path / "hard.md"):
        err = one_line_error(run_cart(*CHUNK, corpus, "-m", tiny_model, "-o", out))
        assert err == f"cart: error: -o {out}: is the input {corpus}; choose another output file"
    assert unchanged(corpus) == before
    # a file inside a corpus directory is read as corpus: refused too
    err = one_line_error(run_cart(*CHUNK, tmp_path, "-m", tiny_model, "-o", corpus))
    assert err == (f"cart: error: -o {corpus}: is a file in the input directory {tmp_path}, "
                   "which would be read as input; choose another output file")
    assert unchanged(corpus) == before


def test_every_stage_refuses_an_output_that_is_an_input(run_cart, tmp_path):
    convos = tmp_path / "c.jsonl"
    convos.write_text('{"schema": "cart.convo/1"}\n')
    cart = tmp_path / "a.safetensors"
    cart.write_bytes(b"not read: refused before")
    questions = tmp_path / "q.jsonl"
    questions.write_text("{}\n")
    cases = [
        (["synth", convos, "-o", convos], f"-o {convos}: is the input {convos}"),
        (["distill", convos, "--log", convos], f"--log {convos}: is the input {convos}"),
        (["distill", convos, "-p", 8, "--init", cart, "-o", cart], f"-o {cart}: is the input {cart}"),
        (["distill", convos, "-o", tmp_path / "x.safetensors", "--checkpoint", convos],
         f"--checkpoint {convos}: is the input {convos}"),
        (["distill", convos, "-o", tmp_path / "x", "--log", tmp_path / "x"],
         f"--log {tmp_path / 'x'}: is also -o {tmp_path / 'x'}"),
        (["eval", questions, "--no-context", "-o", questions],
         f"-o {questions}: is the input {questions}"),
        (["eval", questions, "--icl", convos, "--summary", convos],
         f"--summary {convos}: is the input {convos}"),
        (["compose", cart, cart, "-o", cart], f"-o {cart}: is the input {cart}"),
        (["compact", convos, "-o", convos], f"-o {convos}: is the input {convos}"),
    ]
    before = unchanged(convos, cart, questions)
    for args, message in cases:
        err = one_line_error(run_cart(*args))
        assert err == f"cart: error: {message}; choose another output file", args
    assert unchanged(convos, cart, questions) == before


# -- item 8: an unwritable output directory fails before any work -----------------------------
@pytest.fixture
def readonly_dir(tmp_path):
    """A directory that refuses new files, even to root (who ignores permission bits): sysfs."""
    if os.geteuid() == 0:
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("needs /sys as root")
        yield "/sys"
        return
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    yield str(d)
    d.chmod(0o755)


def test_unwritable_output_directory_fails_at_once(readonly_dir, corpus, run_cart, tmp_path):
    convos = tmp_path / "c.jsonl"
    convos.write_text("{}\n")
    out = f"{readonly_dir}/out.jsonl"
    # no model is given: each refusal comes before the model would load (or training run)
    for args in ([*CHUNK, corpus], ["synth", corpus], ["distill", convos],
                 ["eval", convos, "--no-context"], ["compact", corpus]):
        err = one_line_error(run_cart(*args, "-o", out, "-m", tmp_path / "no-model"))
        assert err.startswith(f"cart: error: {out}: cannot write in directory {readonly_dir}: "), args
    err = one_line_error(run_cart("distill", convos, "--log", out, "-m", tmp_path / "no-model"))
    assert err.startswith(f"cart: error: {out}: cannot write in directory {readonly_dir}: ")


def test_missing_output_directory_fails_at_once(corpus, run_cart, tmp_path):
    out = tmp_path / "nope" / "out.jsonl"
    err = one_line_error(run_cart(*CHUNK, corpus, "-o", out, "-m", tmp_path / "no-model"))
    assert err == f"cart: error: {out}: directory {out.parent} does not exist"


# -- item 9: non-finite floats and absurd counts -------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["eval", "q.jsonl", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["eval", "q.jsonl", "--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["synth", "c.jsonl", "--temperature-a", "-inf"],
     "--temperature-a must be a finite number, got -inf"),
    (["synth", "c.jsonl", "--temperature-b", "nan"], "--temperature-b must be a finite number, got nan"),
    (["synth", "c.jsonl", "--logprob-mass", "nan"], "--logprob-mass must be a finite number, got nan"),
    (["distill", "c.jsonl", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["serve", "--shutdown-timeout", "nan"], "--shutdown-timeout must be a finite number, got nan"),
    (["serve", "--shutdown-timeout", "inf"], "--shutdown-timeout must be a finite number, got inf"),
    (["chunk", "c.md", "-n", "1000000000"], "-n/--num-chunks must be at most 1000000, got 1000000000"),
    (["synth", "c.jsonl", "-n", "1000000000"], "-n/--num-convos must be at most 1000000, got 1000000000"),
    (["synth", "c.jsonl", "--batch-size", "1000000000"],
     "--batch-size must be at most 4096, got 1000000000"),
    (["eval", "q.jsonl", "--batch-size", "1000000000"], "--batch-size must be at most 4096, got 1000000000"),
    (["distill", "c.jsonl", "--batch-size", "1000000000"],
     "--batch-size must be at most 4096, got 1000000000"),
])
def test_non_finite_and_absurd_numbers_are_refused(run_cart, tmp_path, args, message):
    assert one_line_error(run_cart(*args, cwd=tmp_path)) == f"cart: error: {message}"


@pytest.mark.parametrize("name, text, message", [
    ("c.toml", "[eval]\ntemperature = nan\n", "setting 'temperature' must be a finite number, got nan"),
    ("c.toml", "temperature = inf\n", "setting 'temperature' must be a finite number, got inf"),
    ("c.json", '{"eval": {"temperature": NaN}}', "setting 'temperature' must be a finite number, got nan"),
    ("c.json", '{"temperature": -Infinity}', "setting 'temperature' must be a finite number, got -inf"),
    ("c.toml", "batch_size = 100000000\n", "--batch-size must be at most 4096, got 100000000"),
])
def test_config_files_refuse_non_finite_numbers(run_cart, tmp_path, name, text, message):
    cfg = tmp_path / name
    cfg.write_text(text)
    err = one_line_error(run_cart("eval", "q.jsonl", "--config", cfg, cwd=tmp_path))
    prefix = "" if message.startswith("--") else f"{cfg}: "
    assert err == f"cart: error: {prefix}{message}"


def test_no_internal_error_from_a_full_disk_reaches_the_user(tiny_model, corpus, cart_home):
    """A write error past the output's own handling (here: stdout is /dev/full) is one line."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    env = {**os.environ, "CART_HOME": str(cart_home)}
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([str(CART), *map(str, CHUNK), str(corpus), "-m", str(tiny_model)],
                              stdout=full, stderr=subprocess.PIPE, env=env, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["cart: error: cannot write: No space left on device"], err


if sys.platform != "linux":  # /dev/fd, /sys and /dev/full are Linux's
    pytestmark = pytest.mark.skip(reason="Linux only")
