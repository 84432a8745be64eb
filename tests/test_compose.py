"""cart compose: shapes, the single sink, metadata, refusals -- through the CLI."""

import hashlib

import orjson
import pytest
import torch
from conftest import one_line_error

from cart.cartridge import Cartridge
from cart.kvcache import cartridge_from_tokens
from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

TEXT = ("The quick brown fox jumps over the lazy dog. Orbital freight ships dock at bay seven. "
        "Meridian Falls has four bridges and a tram line. Captain Ilsa Voss founded it.")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    ref = resolve_model(str(tiny_model))
    return ref, load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)


def make(tiny, start, p, path, dtype=None, frozen=1, **extra):
    _, model, tok, ident = tiny
    ids = torch.tensor(tok(TEXT).input_ids[start:start + p])
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash, "corpus_tokens": 100 + start,
          "corpus_hash": f"hash{start}", "corpus_paths": [f"corpus{start}.md"],
          "init": {"kind": "corpus"}, **extra}
    cart = cartridge_from_tokens(model, ids, num_frozen=frozen, metadata=md)
    if dtype is not None:
        cart = Cartridge(*[[t.to(dtype) for t in g] for g in (cart.frozen_keys, cart.frozen_values,
                                                              cart.keys, cart.values)], metadata=md)
    cart.save(path)
    return cart


def test_compose_concatenates_with_one_sink(tmp_path, tiny, tiny_model, run_cart):
    a = make(tiny, 0, 10, tmp_path / "a.safetensors")
    b = make(tiny, 12, 7, tmp_path / "b.safetensors", frozen=2)
    out = tmp_path / "ab.safetensors"
    proc = run_cart("compose", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    ab = Cartridge.load(out, expect=tiny[3])
    assert ab.num_tokens == 10 + 7 - 2 and ab.num_frozen == 1
    for i in range(ab.num_layers):
        assert torch.equal(ab.frozen_keys[i], a.frozen_keys[i])  # A's sink, and only it
        assert torch.equal(ab.keys[i], torch.cat([a.keys[i], b.keys[i]], dim=1))
        assert torch.equal(ab.values[i], torch.cat([a.values[i], b.values[i]], dim=1))
    md = ab.metadata
    assert md["corpus_tokens"] == 100 + 112
    assert md["corpus_paths"] == ["corpus0.md", "corpus12.md"]
    assert md["init"] == {"kind": "compose", "sinks": "one", "sink_from": str(tmp_path / "a.safetensors")}
    # the tokens after it start where the largest part was trained to have them
    assert md["query_position"] == 10 and ab.query_position == 10
    parts = md["parts"]
    assert [p["file"] for p in parts] == [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert [p["p"] for p in parts] == [10, 7] and [p["tokens_kept"] for p in parts] == [10, 5]
    assert parts[1]["sha256"] == hashlib.sha256((tmp_path / "b.safetensors").read_bytes()).hexdigest()
    assert parts[0]["corpus_hash"] == "hash0" and parts[0]["init"] == "corpus"
    # order matters for the tensors (measured by cart eval), not for the size
    proc = run_cart("compose", tmp_path / "b.safetensors", tmp_path / "a.safetensors", "-o",
                    tmp_path / "ba.safetensors")
    assert proc.returncode == 0
    ba = Cartridge.load(tmp_path / "ba.safetensors")
    assert ba.num_tokens == 7 + 10 - 1 and ba.num_frozen == 2
    assert torch.equal(ba.frozen_keys[0], b.frozen_keys[0])
    # --sinks all keeps every part whole, its sink included
    proc = run_cart("compose", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--sinks", "all",
                    "-o", tmp_path / "all.safetensors")
    assert proc.returncode == 0, proc.stderr.decode()
    whole = Cartridge.load(tmp_path / "all.safetensors")
    assert whole.num_tokens == 17 and whole.num_frozen == 1 and whole.query_position == 10
    for i in range(whole.num_layers):
        assert torch.equal(whole.layer(i)[0], torch.cat([a.layer(i)[0], b.layer(i)[0]], dim=1))
    assert [p["tokens_kept"] for p in whole.metadata["parts"]] == [10, 7]
    assert whole.metadata["init"]["sinks"] == "all"
    # and `cart info` shows the parts
    proc = run_cart("info", out)
    assert b"parts" in proc.stdout and b"compose" in proc.stdout


def test_compose_three_and_stdout(tmp_path, tiny, run_cart):
    for i, start in enumerate((0, 8, 16)):
        make(tiny, start, 6, tmp_path / f"{i}.safetensors")
    proc = run_cart("compose", *(tmp_path / f"{i}.safetensors" for i in range(3)))
    assert proc.returncode == 0, proc.stderr.decode()
    cart = Cartridge.from_bytes(proc.stdout)
    assert cart.num_tokens == 6 + 5 + 5 and len(cart.metadata["parts"]) == 3


def test_compose_refusals(tmp_path, tiny, other_tiny_model, run_cart):
    a = tmp_path / "a.safetensors"
    make(tiny, 0, 8, a)
    make(tiny, 0, 8, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    ref = resolve_model(str(other_tiny_model))
    other_ident = ModelIdentity.of(ref)
    other = cartridge_from_tokens(load_model(ref), torch.tensor(load_tokenizer(ref)(TEXT).input_ids[:8]),
                                  metadata={"base_model": other_ident.model_id,
                                            "model_config_hash": other_ident.config_hash,
                                            "tokenizer_hash": other_ident.tokenizer_hash})
    other.save(tmp_path / "other.safetensors")
    err = one_line_error(run_cart("compose", a, tmp_path / "other.safetensors", "-o", tmp_path / "x.safetensors"))
    assert err.startswith(f"cart: error: {tmp_path / 'other.safetensors'}: trained for another model than {a} (")
    err = one_line_error(run_cart("compose", a, tmp_path / "bf16.safetensors", "-o", tmp_path / "x.safetensors"))
    assert err == (f"cart: error: {tmp_path / 'bf16.safetensors'}: dtype bfloat16 differs from "
                   f"{a}'s float32")
    err = one_line_error(run_cart("compose", a, "-o", tmp_path / "x.safetensors"))
    assert err == "cart: error: compose needs at least two cartridges"
    err = one_line_error(run_cart("compose", a, a, "--sinks", "two", "-o", tmp_path / "x.safetensors"))
    assert err == "cart: error: --sinks must be one of one, all, got 'two'"
    err = one_line_error(run_cart("compose", a, tmp_path / "missing.safetensors", "-o", tmp_path / "x.safetensors"))
    assert err == f"cart: error: {tmp_path / 'missing.safetensors'}: no such cartridge file"
    (tmp_path / "junk.safetensors").write_bytes(b"not a cartridge")
    err = one_line_error(run_cart("compose", a, tmp_path / "junk.safetensors", "-o", tmp_path / "x.safetensors"))
    assert "junk.safetensors: not a cartridge file" in err
    assert not (tmp_path / "x.safetensors").exists()
    # an existing output survives a refused compose
    (tmp_path / "keep.safetensors").write_bytes(b"old")
    one_line_error(run_cart("compose", a, tmp_path / "bf16.safetensors", "-o", tmp_path / "keep.safetensors"))
    assert (tmp_path / "keep.safetensors").read_bytes() == b"old"


def test_info_and_compose_read_stdin(tmp_path, tiny, run_cart):
    """`cart info -` and `cart compose -` read stdin like every other stage (issue 15, item 11)."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make(tiny, 0, 6, a)
    make(tiny, 8, 5, b)
    proc = run_cart("info", "-", "--json", input=a.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    info = orjson.loads(proc.stdout)
    assert info["file"] == "<stdin>" and info["file_bytes"] == a.stat().st_size
    assert info["metadata"]["p"] == 6
    proc = run_cart("info", "-", input=a.read_bytes())
    assert proc.stdout.startswith(b"file ") and b"<stdin>" in proc.stdout.splitlines()[0]
    # stdin as one of the parts, in place
    proc = run_cart("compose", a, "-", input=b.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    ab = Cartridge.from_bytes(proc.stdout)
    assert ab.num_tokens == 6 + 4
    assert [p["file"] for p in ab.metadata["parts"]] == [str(a), "<stdin>"]
    assert ab.metadata["parts"][1]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    # stdin twice, and bad bytes on stdin: one line each
    assert one_line_error(run_cart("compose", "-", "-", input=a.read_bytes())) == (
        "cart: error: - (stdin) is given more than once; it can be read only once")
    assert one_line_error(run_cart("info", "-", input=b"")) == (
        "cart: error: <stdin>: not a cartridge file (empty or truncated)")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    assert one_line_error(run_cart("compose", a, "-", "-o", out, input=b"junk")).startswith(
        "cart: error: <stdin>: not a cartridge file")
    assert out.read_bytes() == b"keep"
