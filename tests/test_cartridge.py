"""The cartridge file: save/load, metadata, refusals, and its meaning as a prefix KV cache."""

import json
import struct

import pytest
import torch
from conftest import one_line_error
from reference import cartridge_cache

from cart.cartridge import Cartridge, read_metadata
from cart.io import CartError
from cart.kvcache import cartridge_from_tokens
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
                          past_key_values=cartridge_cache(model, cart)).logits
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
    ("format", "unsupported cartridge format cart.cartridge/4 (this cart reads cart.cartridge/1, /2 and /3)"),
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
        _rewrite_header(cart_file, lambda h: h["__metadata__"].update(format="cart.cartridge/4"))
    elif damage == "not_cart":
        _rewrite_header(cart_file, lambda h: h["__metadata__"].pop("format"))
    elif damage == "missing_key":
        _rewrite_header(cart_file, lambda h: h["__metadata__"].pop("tokenizer_hash"))
    elif damage == "missing_tensor":
        def drop(h):
            h["__metadata__"].pop("tensor_sha256")  # as an older file: the data is re-packed
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


# -- crafted headers, checksums and non-finite values (issue 15, items 4 and 5) ---------------
def _set_metadata(value):
    def mutate(h):
        h["__metadata__"] = value(h["__metadata__"])
    return mutate


def _set_entry(field, value):
    def mutate(h):
        h["frozen.0.keys"][field] = value
    return mutate


def _deep(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


_HEADER = "corrupt cartridge file (safetensors header: "


@pytest.mark.parametrize("craft, expected", [
    (_set_metadata(lambda md: list(md.items())), _HEADER + "__metadata__ must map strings to strings)"),
    (_set_metadata(lambda md: "abc"), _HEADER + "__metadata__ must map strings to strings)"),
    (_set_metadata(lambda md: {**md, "format": 2}), _HEADER + "__metadata__ must map strings to strings)"),
    (_set_entry("data_offsets", 5), _HEADER + "tensor 'frozen.0.keys': data_offsets must be two "
                                              "integers [begin, end], 0 <= begin <= end)"),
    (_set_entry("data_offsets", [0, 10**12]), _HEADER + "tensor 'frozen.0.keys': data_offsets span "
                                                        "1000000000000 bytes, its shape and dtype need 128)"),
    (_set_entry("dtype", "I64"), _HEADER + "tensor 'frozen.0.keys' has dtype 'I64', not one of F32, BF16, F16)"),
    (_set_entry("shape", [2, "1", 16]), _HEADER + "tensor 'frozen.0.keys': shape must be a list of "
                                                  "non-negative integers)"),
    (_set_metadata(lambda md: {**md, "dtype": "int64"}),
     "corrupt cartridge metadata (dtype 'int64' is not one of float32, bfloat16, float16)"),
    (_set_metadata(lambda md: {**md, "num_layers": "1"}),
     "corrupt cartridge file (unexpected tensor frozen.1.keys; the metadata says num_layers=1)"),
    (_deep, "not a cartridge file (corrupt safetensors header)"),
], ids=["metadata-list", "metadata-string", "int-format", "int-offsets", "offsets-beyond-file",
        "dtype", "shape", "metadata-dtype", "metadata-layers", "deep-nesting"])
def test_crafted_headers_are_refused_in_one_line(run_cart, cart_file, craft, expected):
    if craft is _deep:
        _deep(cart_file)
    else:
        _rewrite_header(cart_file, craft)
    assert one_line_error(run_cart("info", cart_file)) == f"cart: error: {cart_file}: {expected}"


def test_two_dimensional_first_keys_are_refused_in_one_line(run_cart, cart_file):
    """Found by the fuzz suite: first trainable keys of rank 2 (the same bytes) crashed the
    shape check that compares every tensor with them."""
    shapes = {}

    def flatten(h):
        shapes["old"] = h["trainable.0.keys"]["shape"]
        a, b, c = shapes["old"]
        h["trainable.0.keys"]["shape"] = [a * b, c]

    _rewrite_header(cart_file, flatten)
    a, b, c = shapes["old"]
    assert one_line_error(run_cart("info", cart_file)) == (
        f"cart: error: {cart_file}: corrupt cartridge file (trainable.keys.0: shape ({a * b}, {c}) "
        "is not [kv_heads, p, head_dim])")


def test_a_crafted_header_is_one_line_in_every_stage(run_cart, cart_file, tiny_model, tmp_path):
    """compose, eval and distill --init read cartridges through the same checks as info."""
    _rewrite_header(cart_file, _set_metadata(lambda md: list(md.items())))
    expected = f"cart: error: {cart_file}: {_HEADER}__metadata__ must map strings to strings)"
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q1", "question": "Who?", "answers": ["Ada"]}\n')
    out = tmp_path / "out.safetensors"
    for args in (["compose", cart_file, cart_file, "-o", out],
                 ["eval", questions, "-m", tiny_model, "-c", cart_file],
                 ["distill", questions, "-m", tiny_model, "--init", cart_file, "-o", out]):
        assert one_line_error(run_cart(*args)) == expected, args
    assert not out.exists()


def test_a_flipped_bit_in_a_tensor_is_refused(run_cart, cart_file):
    data = bytearray(cart_file.read_bytes())
    data[-5] ^= 0x04  # inside the last tensor: still a well-formed file
    cart_file.write_bytes(bytes(data))
    assert one_line_error(run_cart("info", cart_file)) == (
        f"cart: error: {cart_file}: corrupt cartridge file (the tensor data does not match the "
        "checksum in its metadata: damaged or edited)")


def test_the_checksum_covers_the_tensor_data_and_older_files_load(tiny, tmp_path):
    import hashlib

    path = tmp_path / "c.safetensors"
    cart = make_cartridge(tiny)
    cart.save(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert read_metadata(path)["tensor_sha256"] == hashlib.sha256(data[8 + n:]).hexdigest()
    again = Cartridge.load(path)
    again.save(path)  # the loaded checksum is recomputed, not copied
    assert read_metadata(path)["tensor_sha256"] == hashlib.sha256(data[8 + n:]).hexdigest()
    _rewrite_header(path, lambda h: h["__metadata__"].pop("tensor_sha256"))  # an older file
    assert torch.equal(Cartridge.load(path).keys[0], cart.keys[0])


def test_a_non_finite_cartridge_is_never_written_nor_loaded(tiny, tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"precious")
    cart = make_cartridge(tiny)
    cart.keys[1] = cart.keys[1].clone()
    cart.keys[1][0, 0, 0] = float("nan")
    with pytest.raises(CartError) as e:
        cart.save(path)
    assert str(e.value) == (f"{path}: not written: tensor trainable.1.keys of the cartridge holds "
                            "NaN or infinite values")
    assert path.read_bytes() == b"precious"
    # a file written before this check (no checksum): refused when read
    from safetensors.torch import save

    from cart.cartridge import encode_metadata

    path.write_bytes(save(cart.tensors(), metadata=encode_metadata(cart.full_metadata())))
    with pytest.raises(CartError) as e:
        Cartridge.load(path)
    assert str(e.value) == (f"{path}: corrupt cartridge file (tensor trainable.1.keys holds NaN or "
                            "infinite values)")
