"""The cartridge store of cart serve: names, LRU bound, reload, rejections."""

import logging
import os
import time

import pytest
import torch

from cart.kvcache import cartridge_from_tokens
from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model
from cart.store import CartridgeStore, UnknownCartridge

TEXT = "Orbital freight ships dock at bay seven. Meridian Falls has four bridges and a tram line."


@pytest.fixture(scope="module")
def tiny(tiny_model):
    ref = resolve_model(str(tiny_model))
    return load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)


def save(tiny, path, p=8, start=0):
    model, tok, ident = tiny
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash}
    cart = cartridge_from_tokens(model, torch.tensor(tok(TEXT).input_ids[start:start + p]), metadata=md)
    cart.save(path)
    return cart


def test_names_lookup_and_no_escape(tmp_path, tiny):
    d = tmp_path / "carts"
    d.mkdir()
    save(tiny, d / "a.safetensors")
    save(tiny, tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", d / "link.safetensors")
    (d / "notes.txt").write_text("x")
    store = CartridgeStore(d, tiny[2])
    assert store.names() == ["a"]
    assert store.get("a").num_tokens == 8
    for bad in ("../outside", "link", "outside", "a/../a", "", ".hidden", "a.safetensors", None):
        with pytest.raises(UnknownCartridge):
            store.get(bad)
    # a new file is seen without restarting
    save(tiny, d / "b.safetensors", p=6)
    assert store.names() == ["a", "b"]


def test_lru_bound_and_reload(tmp_path, tiny):
    d = tmp_path / "carts"
    d.mkdir()
    one = save(tiny, d / "a.safetensors").kv_bytes()
    save(tiny, d / "b.safetensors")
    save(tiny, d / "c.safetensors")
    store = CartridgeStore(d, tiny[2], max_bytes=2 * one)
    for n in ("a", "b", "c"):
        store.get(n)
    assert store.loaded_names() == ["b", "c"] and store.loaded_bytes() == 2 * one
    store.get("b")
    store.get("a")
    assert store.loaded_names() == ["b", "a"]
    # changed on disk: reloaded
    time.sleep(0.01)
    save(tiny, d / "a.safetensors", p=5, start=3)
    assert store.get("a").num_tokens == 5
    # deleted: gone
    (d / "a.safetensors").unlink()
    with pytest.raises(UnknownCartridge):
        store.get("a")
    assert "a" not in store.loaded_names()


def test_corrupt_and_foreign_cartridges_are_rejected_and_logged(tmp_path, tiny, other_tiny_model, caplog):
    d = tmp_path / "carts"
    d.mkdir()
    save(tiny, d / "good.safetensors")
    (d / "junk.safetensors").write_bytes(b"not a cartridge at all")
    ref = resolve_model(str(other_tiny_model))
    save((load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)), d / "foreign.safetensors")
    store = CartridgeStore(d, tiny[2])
    with caplog.at_level(logging.WARNING, logger="cart.serve"):
        assert store.names() == ["good"]
    rejected = store.rejected()
    assert set(rejected) == {"junk", "foreign"}
    assert "not a cartridge file" in rejected["junk"] and "trained for model" in rejected["foreign"]
    assert sum("rejected cartridge" in r.message for r in caplog.records) == 2
    with pytest.raises(UnknownCartridge, match="unusable"):
        store.get("junk")
    # fixed on disk: accepted
    time.sleep(0.01)
    save(tiny, d / "junk.safetensors")
    assert store.names() == ["good", "junk"]
