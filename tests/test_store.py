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


def why_unusable(store, name):
    """The reason the store gives for not serving ``name`` (what a request's 404 says)."""
    with pytest.raises(UnknownCartridge) as e:
        store.entry(name)
    return str(e.value).removeprefix(f"cartridge {name!r} is unusable: ")


def test_names_lookup_and_no_escape(tmp_path, tiny):
    d = tmp_path / "carts"
    d.mkdir()
    save(tiny, d / "a.safetensors")
    save(tiny, tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", d / "link.safetensors")
    (d / "notes.txt").write_text("x")
    store = CartridgeStore(d, tiny[2])
    assert store.names() == ["a"]
    assert store.entry("a").cartridge.num_tokens == 8
    for bad in ("../outside", "link", "outside", "a/../a", "", ".hidden", "a.safetensors", None):
        with pytest.raises(UnknownCartridge):
            store.entry(bad)
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
        store.entry(n)
    assert store.loaded_names() == ["b", "c"] and store.loaded_bytes() == 2 * one
    store.entry("b")
    store.entry("a")
    assert store.loaded_names() == ["b", "a"]
    # changed on disk: reloaded
    time.sleep(0.01)
    save(tiny, d / "a.safetensors", p=5, start=3)
    assert store.entry("a").cartridge.num_tokens == 5
    # deleted: gone
    (d / "a.safetensors").unlink()
    with pytest.raises(UnknownCartridge):
        store.entry("a")
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
    rejected = {name: why_unusable(store, name) for name in ("junk", "foreign")}
    assert "not a cartridge file" in rejected["junk"] and "trained for model" in rejected["foreign"]
    assert sum("rejected cartridge" in r.message for r in caplog.records) == 2
    with pytest.raises(UnknownCartridge, match="unusable"):
        store.entry("junk")
    # fixed on disk: accepted
    time.sleep(0.01)
    save(tiny, d / "junk.safetensors")
    assert store.names() == ["good", "junk"]


def crafted(header: bytes) -> bytes:
    """A safetensors file with this JSON header (and a few data bytes)."""
    import struct

    return struct.pack("<Q", len(header)) + header + b"\0" * 16


# headers that gave internal errors (issue 15, item 5): a non-object metadata, integer offsets,
# an integer format, 100k-deep nesting
CRAFTED = {
    "meta_list": b'{"__metadata__": [1, 2]}',
    "meta_str": b'{"__metadata__": "x"}',
    "offsets_int": b'{"__metadata__": {"format": "cart.cartridge/1"}, "layers.0.keys": '
                   b'{"dtype": "F32", "shape": [1], "data_offsets": 4}}',
    "format_int": b'{"__metadata__": {"format": 7}}',
    "deep": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


def test_crafted_headers_are_skipped_with_a_warning(tmp_path, tiny, caplog):
    """The store lists the good cartridge and rejects each crafted file with its reason and one
    warning -- at the first listing (startup) and when dropped in later -- never raising."""
    d = tmp_path / "carts"
    d.mkdir()
    save(tiny, d / "good.safetensors")
    first, later = list(CRAFTED)[:3], list(CRAFTED)[3:]
    for name in first:
        (d / f"{name}.safetensors").write_bytes(crafted(CRAFTED[name]))
    store = CartridgeStore(d, tiny[2])
    with caplog.at_level(logging.WARNING, logger="cart.serve"):
        assert store.names() == ["good"]
        for name in later:
            (d / f"{name}.safetensors").write_bytes(crafted(CRAFTED[name]))
        assert store.names() == ["good"]
        assert store.names() == ["good"]  # warned once per file, not per listing
    warned = [r.message for r in caplog.records if r.message.startswith("rejected cartridge ")]
    assert sorted(m.split()[2].rstrip(":") for m in warned) == sorted(CRAFTED)
    for name in CRAFTED:
        with pytest.raises(UnknownCartridge, match=f"^cartridge '{name}' is unusable: "):
            store.entry(name)


def test_a_deleted_cartridge_leaves_memory_without_a_request(tmp_path, tiny):
    """It stayed in loaded_names() (GET /health) until a request named it (issue 15, item 10)."""
    d = tmp_path / "carts"
    d.mkdir()
    save(tiny, d / "a.safetensors")
    save(tiny, d / "b.safetensors")
    store = CartridgeStore(d, tiny[2])
    assert store.names() == ["a", "b"] and store.loaded_names() == ["a", "b"]
    one = store.loaded_bytes() // 2
    (d / "a.safetensors").unlink()
    assert store.loaded_names() == ["b"] and store.loaded_bytes() == one
    (d / "b.safetensors").unlink()
    assert store.names() == [] and store.loaded_names() == [] and store.loaded_bytes() == 0


def test_symlinks_alias_inside_and_are_refused_out_of_the_directory(tmp_path, tiny, caplog):
    """A link to a cartridge of the directory is served under its name too; a link out of it
    (or to nothing) is not, with a warning and the reason in the 404."""
    d = tmp_path / "carts"
    d.mkdir()
    save(tiny, d / "a.safetensors")
    save(tiny, tmp_path / "outside.safetensors")
    os.symlink("a.safetensors", d / "alias.safetensors")
    os.symlink(tmp_path / "outside.safetensors", d / "out.safetensors")
    os.symlink(d / "missing.safetensors", d / "dangling.safetensors")
    store = CartridgeStore(d, tiny[2])
    with caplog.at_level(logging.WARNING, logger="cart.serve"):
        assert store.names() == ["a", "alias"]
        assert store.names() == ["a", "alias"]
    reason = ("a symbolic link that does not lead to a file in the cartridge directory (links out "
              "of it are not served)")
    assert {name: why_unusable(store, name) for name in ("out", "dangling")} == {
        "out": reason, "dangling": reason}
    assert sorted(r.message for r in caplog.records) == [
        f"rejected cartridge dangling: {reason}", f"rejected cartridge out: {reason}"]
    with pytest.raises(UnknownCartridge) as e:
        store.entry("out")
    assert str(e.value) == f"cartridge 'out' is unusable: {reason}"
    assert store.entry("alias").cartridge.num_tokens == 8
