"""The cartridge file: save/load, metadata, refusals, and its meaning as a prefix KV cache."""

import json
import struct

import pytest
import torch
from conftest import one_line_error

from cart.cartridge import Cartridge, read_metadata
from cart.io import CartError
from cart.kvcache import cache_from_cartridge, cartridge_from_tokens
from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

TEXT = ("The quick brown fox jumps over the lazy dog. Orbital freight ships dock at bay seven. "
        "Meridian Falls has four bridges and a tram line.")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    ref = resolve_model(str(tiny_model))
    model, tok = load_model(ref), load_tokenizer(ref)
    return ref, model, tok, ModelIdentity.of(ref)


def make_cartridge(tiny, p=12, **extra):
    ref, model, tok, ident = tiny
    ids = torch.tensor(tok(TEXT).input_ids)
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash, "corpus_tokens": 1200, "corpus_hash": "abc",
          "init": {"method": "first_tokens"}, **extra}
    return cartridge_from_tokens(model, ids[:p], metadata=md)


def test_prefix_cartridge_reproduces_the_full_sequence_logits(tiny):
    """Keys at positions 0..p-1 and queries from position p: same as the text in context."""
    _, model, tok, _ = tiny
    ids = torch.tensor(tok(TEXT).input_ids)
    cart = make_cartridge(tiny, p=12)
    with torch.no_grad():
        full = model(input_ids=ids.view(1, -1)).logits[:, 12:]
        with_cart = model(input_ids=ids[12:].view(1, -1),
                          past_key_values=cache_from_cartridge(cart, model)).logits
    torch.testing.assert_close(with_cart, full, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_keeps_tensors_and_metadata(tiny, tmp_path):
    cart = make_cartridge(tiny)
    path = tmp_path / "c.safetensors"
    cart.save(path)
    loaded = Cartridge.load(path, expect=tiny[3])
    assert (loaded.num_tokens, loaded.num_frozen, loaded.dtype) == (12, 1, "float32")
    for i in range(cart.num_layers):
        assert torch.equal(loaded.layer(i)[0], cart.layer(i)[0])
        assert torch.equal(loaded.layer(i)[1], cart.layer(i)[1])
        assert torch.equal(loaded.frozen_keys[i], cart.frozen_keys[i])
    md = loaded.metadata
    assert md["format"] == "cart.cartridge/1" and md["p"] == 12 and md["num_frozen_tokens"] == 1
    assert md["init"] == {"method": "first_tokens"} and md["corpus_tokens"] == 1200
    assert {"cart_version", "created", "kv_heads", "head_dim", "num_layers"} <= set(md)
    assert read_metadata(path)["tokenizer_hash"] == tiny[3].tokenizer_hash


def test_bf16_cartridge_halves_the_bytes(tiny, tmp_path):
    cart = make_cartridge(tiny)
    half = Cartridge([t.bfloat16() for t in cart.frozen_keys], [t.bfloat16() for t in cart.frozen_values],
                     [t.bfloat16() for t in cart.keys], [t.bfloat16() for t in cart.values],
                     cart.metadata)
    assert half.kv_bytes() * 2 == cart.kv_bytes()
    half.save(tmp_path / "h.safetensors")
    assert Cartridge.load(tmp_path / "h.safetensors").dtype == "bfloat16"


def test_refuses_a_model_it_was_not_trained_for(tiny, other_tiny_model):
    other = ModelIdentity.of(resolve_model(str(other_tiny_model)))
    with pytest.raises(CartError, match=r"^x: trained for model .* not .*other-tiny-model"):
        make_cartridge(tiny).check_compatible(other, "x")


def test_inconsistent_tensors_are_refused(tiny):
    cart = make_cartridge(tiny)
    with pytest.raises(ValueError, match="differ in token count"):
        Cartridge(cart.frozen_keys, cart.frozen_values, cart.keys,
                  [v[:, :-1] for v in cart.values], cart.metadata)


# -- through the CLI ---------------------------------------------------------------------
@pytest.fixture
def cart_file(tiny, tmp_path):
    path = tmp_path / "c.safetensors"
    make_cartridge(tiny).save(path)
    return path


def test_info_prints_metadata_sizes_and_compression(run_cart, cart_file, tiny_model):
    proc = run_cart("info", cart_file, "--json", "--model", tiny_model)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x K,V x kv heads x head dim x fp32
    assert info["kv_bytes_per_token"] == per_token
    assert info["kv_bytes"] == 12 * per_token
    assert info["corpus_kv_bytes"] == 1200 * per_token
    assert info["compression_ratio"] == 100.0
    assert info["file_bytes"] == cart_file.stat().st_size
    assert info["compatible_with"] == tiny_model.name
    text = run_cart("info", cart_file).stdout.decode()
    assert "100.0x smaller than the corpus's KV cache" in text
    assert f"file size          {cart_file.stat().st_size} bytes" in text
    assert "model_config_hash" in text and "corpus_hash" in text


def test_info_refuses_cartridge_for_another_model(run_cart, cart_file, other_tiny_model, tiny):
    proc = run_cart("info", cart_file, "--model", other_tiny_model)
    other = ModelIdentity.of(resolve_model(str(other_tiny_model)))
    assert one_line_error(proc) == (
        f"cart: error: {cart_file}: trained for model {tiny[3].model_id} (config "
        f"{tiny[3].config_hash}), not {other.model_id} (config {other.config_hash})")


def _rewrite_header(path, mutate):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "corrupt cartridge file (expected {size} bytes, found {cut}: truncated?)"),
    ("empty", "not a cartridge file (empty or truncated)"),
    ("garbage", "not a cartridge file (truncated or not safetensors)"),
    ("header", "not a cartridge file (corrupt safetensors header)"),
    ("format", "unsupported cartridge format cart.cartridge/3 (this cart reads cart.cartridge/1 and /2)"),
    ("not_cart", "not a cart cartridge (metadata format is 'missing')"),
    ("missing_tensor", "corrupt cartridge file (missing tensor trainable.1.values)"),
    ("missing_key", "not a cart cartridge (metadata lacks 'tokenizer_hash')"),
])
def test_damaged_files_are_refused_in_one_line(run_cart, cart_file, damage, expected):
    data = cart_file.read_bytes()
    size = len(data)
    cut = size - 100
    if damage == "truncate":
        cart_file.write_bytes(data[:cut])
    elif damage == "empty":
        cart_file.write_bytes(b"")
    elif damage == "garbage":
        cart_file.write_bytes(b"\xff" * 64)
    elif damage == "header":
        cart_file.write_bytes(struct.pack("<Q", 10) + b"{not json!" + data[18:])
    elif damage == "format":
        _rewrite_header(cart_file, lambda h: h["__metadata__"].update(format="cart.cartridge/3"))
    elif damage == "not_cart":
        _rewrite_header(cart_file, lambda h: h["__metadata__"].pop("format"))
    elif damage == "missing_key":
        _rewrite_header(cart_file, lambda h: h["__metadata__"].pop("tokenizer_hash"))
    elif damage == "missing_tensor":
        def drop(h):
            entry = h.pop("trainable.1.values")
            start, end = entry["data_offsets"]
            for v in h.values():  # the data it pointed at becomes unaccounted for: re-pack
                if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= end:
                    v["data_offsets"] = [o - (end - start) for o in v["data_offsets"]]
            drop.cut = (start, end)
        _rewrite_header(cart_file, drop)
        data2 = cart_file.read_bytes()
        (n,) = struct.unpack("<Q", data2[:8])
        body = data2[8 + n:]
        start, end = drop.cut
        cart_file.write_bytes(data2[:8 + n] + body[:start] + body[end:])
    proc = run_cart("info", cart_file)
    assert one_line_error(proc) == f"cart: error: {cart_file}: " + expected.format(size=size, cut=cut)
    assert proc.returncode == 1


def test_missing_cartridge_file(run_cart, tmp_path):
    proc = run_cart("info", tmp_path / "none.safetensors")
    assert one_line_error(proc) == f"cart: error: {tmp_path / 'none.safetensors'}: no such cartridge file"


def test_loading_never_uses_pickle(cart_file, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert Cartridge.load(cart_file).num_tokens == 12
