"""cart convert and PEFT CARTRIDGE adapters (issue 17): a cart cartridge exported to PEFT gives
PEFT the logits cart's engine gives; an adapter PEFT made gives cart the logits PEFT gives;
every stage reads an adapter folder; round trips are bit-identical; mismatches are refused in
one line, leaving existing outputs untouched. peft is a test dependency (the test extra)."""

from __future__ import annotations

import json
import os

import orjson
import peft
import pytest
import torch
from conftest import one_line_error
from peft import CartridgeConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.cartridge.utils import compose_cartridge_adapters, initialize_kv_prefix_from_text
from reference import cartridge_cache
from tiny import build_tiny_model

from cart.cartridge import Cartridge, read_metadata
from cart.compose import compose_parts
from cart.engines.base import GenerationRequest, KVPrefix
from cart.engines.hf import TransformersEngine
from cart.io import CartError
from cart.kvcache import cartridge_from_tokens
from cart.models import ModelIdentity, load_model, resolve_model
from cart.store import CartridgeStore, UnknownCartridge

TEXT = ("The quick brown fox jumps over the lazy dog. Orbital freight ships dock at bay seven. "
        "Meridian Falls has four bridges and a tram line.")
PROMPTS = ["Captain Ilsa Voss founded", "The answer is forty two. Meridian", "x",
           "Numbers 0 1 2 3 4 5 6 7 8 9 appear too. Orbital freight ships dock at"]
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model with sharp logits (so 1e-5 is a real bound, not noise around zero)."""
    return build_tiny_model(tmp_path_factory.mktemp("convert") / "sharp-tiny", seed=2,
                            init_range=0.1)


@pytest.fixture(scope="module")
def engine(model_dir):
    return TransformersEngine.load(str(model_dir))


def base_model(model_dir):
    return load_model(resolve_model(str(model_dir)))


def make_cartridge(engine, p=12, seed=0, **extra):
    """The KV of TEXT's first p tokens, trainable part perturbed (as if trained)."""
    ident = engine.identity
    ids = torch.tensor(engine.tokenizer(TEXT).input_ids[:p])
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash, "corpus_tokens": 1200, "corpus_hash": "abc",
          "synth": {"seed": 3}, "training": {"lr": 0.02}, "steps": 7, "loss": 0.25,
          "init": {"kind": "corpus"}, **extra}
    cart = cartridge_from_tokens(engine.model, ids, metadata=md)
    g = torch.Generator().manual_seed(seed)
    for t in cart.keys + cart.values:
        t.add_(0.3 * torch.randn(t.shape, generator=g))
    return cart


def cart_logits(engine, cart, ids):
    """Last-position logits of cart's own engine (eval and serve's path) behind ``cart``."""
    with torch.inference_mode():
        _, logits = engine.prefill(GenerationRequest(ids, 1, kv_prefix=KVPrefix.of_cartridge(cart, "k")))
    return logits


def peft_logits(peft_model, ids):
    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor([ids]),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0, -1].float()


def plain_logits(engine, ids):
    with torch.no_grad():
        return engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def cache_logits(engine, cart, ids):
    """Plain transformers with the cartridge as its cache (queries from position p on)."""
    model = engine.model_for_cache = getattr(engine, "model_for_cache", None) or base_model(
        engine.model.name_or_path)  # a model of its own: the engine's attends through cart_gqa
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]),
                     past_key_values=cartridge_cache(model, cart)).logits[0, -1].float()


def assert_same_logits(engine, cart, peft_model, tol=TOL):
    """PEFT's next-token logits agree with cart's engine (within ``tol``: cart's attention
    kernel rounds differently) and with transformers given the cartridge as a cache (the same
    computation: within 1e-6), on every prompt. Returns the largest difference from cart's."""
    worst = 0.0
    for text in PROMPTS:
        ids = engine.tokenizer(text).input_ids
        ours, theirs = cart_logits(engine, cart, ids), peft_logits(peft_model, ids)
        worst = max(worst, float((ours - theirs).abs().max()))
        assert float((cache_logits(engine, cart, ids) - theirs).abs().max()) <= 1e-6
        # the cartridge matters: without it the logits are far off
        assert float((plain_logits(engine, ids) - theirs).abs().max()) > 100 * tol
    assert worst <= tol, worst
    return worst


def peft_made_adapter(model_dir, tokenizer, folder, p=10, frozen=1, text=TEXT, seed=1):
    """An adapter made with PEFT's own API: KV of ``text`` (initialize_kv_prefix_from_text), the
    trainable tokens perturbed, saved with save_pretrained. Returns the PeftModel."""
    pm = get_peft_model(base_model(model_dir), CartridgeConfig(
        num_virtual_tokens=p, num_frozen_tokens=frozen, task_type="CAUSAL_LM"))
    initialize_kv_prefix_from_text(pm, tokenizer, text=text)
    g = torch.Generator().manual_seed(seed)
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():
        enc.trainable_embedding.add_(0.3 * torch.randn(enc.trainable_embedding.shape, generator=g))
    pm.save_pretrained(str(folder))
    return pm.eval()


def snapshot(path):
    """Every file under a path (or the file), as bytes: a refused run must leave them alone."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_file(x, y):
    """Two cartridge files hold the same tensor bytes and the same metadata (safetensors writes
    the metadata's keys in a hash order of its own, so the headers' bytes may differ)."""
    from cart.cartridge import data_section_sha256, read_metadata_bytes

    dx, dy = x.read_bytes(), y.read_bytes()
    assert len(dx) == len(dy) and data_section_sha256(dx) == data_section_sha256(dy)
    assert read_metadata_bytes(dx, "x") == read_metadata_bytes(dy, "y")


# -- cart -> PEFT --------------------------------------------------------------------------------
def test_cart_cartridge_in_peft_gives_cart_engine_logits(run_cart, engine, model_dir, tmp_path):
    cart = make_cartridge(engine)
    cart.save(tmp_path / "c.safetensors")
    proc = run_cart("convert", tmp_path / "c.safetensors", "--to", "peft", "-o", tmp_path / "ad",
                    "--model", model_dir)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "CARTRIDGE" and config["num_virtual_tokens"] == 12
    assert config["num_frozen_tokens"] == 1
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    # PEFT's own loader, no cart code: queries at positions p.. as in cart (query_position p)
    pm = PeftModel.from_pretrained(base_model(model_dir), str(tmp_path / "ad")).eval()
    assert cart.query_position == cart.num_tokens == 12
    print(f"tiny: max |logit difference| cart engine vs PEFT {assert_same_logits(engine, cart, pm):.3g}")


def test_peft_loads_the_frozen_sink_apart(engine, model_dir, tmp_path):
    from cart.convert import convert

    cart = make_cartridge(engine, p=9)
    cart.save(tmp_path / "c.safetensors")
    convert(str(tmp_path / "c.safetensors"), str(tmp_path / "ad"), "peft", str(model_dir))
    pm = PeftModel.from_pretrained(base_model(model_dir), str(tmp_path / "ad"))
    enc = pm.prompt_encoder["default"]
    assert enc.frozen_embedding.shape[0] == 1 and enc.trainable_embedding.shape[0] == 8
    assert not enc.frozen_embedding.requires_grad
    # row t = token t, laid out [layer][key, value][kv head][head dim]
    row = enc.frozen_embedding[0].view(cart.num_layers, 2, cart.kv_heads, cart.head_dim)
    assert torch.equal(row[1, 0], cart.frozen_keys[1][:, 0])
    assert torch.equal(row[0, 1], cart.frozen_values[0][:, 0])


def test_round_trip_is_bit_identical(run_cart, engine, model_dir, tmp_path):
    cart = make_cartridge(engine)
    cart.save(tmp_path / "c.safetensors")
    assert run_cart("convert", tmp_path / "c.safetensors", "-o", tmp_path / "ad").returncode == 0
    proc = run_cart("convert", tmp_path / "ad", "-o", tmp_path / "back.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert_same_file(tmp_path / "back.safetensors", tmp_path / "c.safetensors")
    back = Cartridge.load(tmp_path / "back.safetensors", engine.identity)
    for a, b in zip(cart.tensors().values(), back.tensors().values()):
        assert torch.equal(a, b)
    # and cart reads the folder itself, metadata whole
    assert read_metadata(tmp_path / "ad") == read_metadata(tmp_path / "c.safetensors")


def test_round_trip_keeps_bfloat16(run_cart, engine, tmp_path):
    cart = make_cartridge(engine)
    half = Cartridge(*[[t.bfloat16() for t in g] for g in (cart.frozen_keys, cart.frozen_values,
                                                         cart.keys, cart.values)], cart.metadata)
    half.save(tmp_path / "h.safetensors")
    assert run_cart("convert", tmp_path / "h.safetensors", "-o", tmp_path / "ad").returncode == 0
    assert run_cart("convert", tmp_path / "ad", "-o", tmp_path / "back.safetensors").returncode == 0
    assert_same_file(tmp_path / "back.safetensors", tmp_path / "h.safetensors")
    assert read_metadata(tmp_path / "back.safetensors")["dtype"] == "bfloat16"


# -- PEFT -> cart --------------------------------------------------------------------------------
def test_peft_made_adapter_gives_peft_logits_in_cart(engine, model_dir, tmp_path):
    pm = peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "peft-ad")
    # eval's path: the one loader, then the engine
    cart = Cartridge.load(tmp_path / "peft-ad", engine.identity)
    assert (cart.num_tokens, cart.num_frozen, cart.query_position) == (10, 1, 10)
    print(f"tiny: max |logit difference| PEFT vs cart engine {assert_same_logits(engine, cart, pm):.3g}")
    # serve's path: the store lists the folder by its name
    store = CartridgeStore(tmp_path, engine.identity)
    assert store.names() == ["peft-ad"]
    served = store.entry("peft-ad").cartridge
    for a, b in zip(served.tensors().values(), cart.tensors().values()):
        assert torch.equal(a, b)
    assert_same_logits(engine, served, pm)


def test_peft_made_adapter_converts_and_records_what_it_knows(run_cart, engine, model_dir, tmp_path):
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "ad", p=7, frozen=2)
    proc = run_cart("convert", tmp_path / "ad", "-o", tmp_path / "c.safetensors")
    assert proc.returncode == 0, proc.stderr
    md = read_metadata(tmp_path / "c.safetensors")
    ident = engine.identity
    assert (md["p"], md["num_frozen_tokens"], md["dtype"]) == (7, 2, "float32")
    assert (md["base_model"], md["model_config_hash"], md["tokenizer_hash"]) == (
        ident.model_id, ident.config_hash, ident.tokenizer_hash)
    assert md["init"] == {"kind": "peft", "adapter": "ad", "identity": "base_model_name_or_path",
                          "base_model_name_or_path": resolve_model(str(model_dir)).path,
                          "peft_version": peft.__version__}
    assert not {"corpus_hash", "synth", "training", "query_position"} & set(md)
    # PEFT -> cart -> PEFT: the same tensor PEFT wrote
    assert run_cart("convert", tmp_path / "c.safetensors", "-o", tmp_path / "again").returncode == 0
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "ad" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"])


def test_info_shows_what_peft_does_not_record_as_unknown(run_cart, engine, model_dir, tmp_path):
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "ad")
    proc = run_cart("info", tmp_path / "ad", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["unknown"] == ["corpus_hash", "corpus_tokens", "corpus_paths", "synth",
                               "training", "steps", "tokens", "loss"]
    assert "compression_ratio" not in info and "corpus_hash" not in info["metadata"]
    text = run_cart("info", tmp_path / "ad").stdout.decode()
    rows = dict(line.split(None, 1) for line in text.splitlines() if " " in line)
    for key in ("corpus_hash", "synth", "training"):
        assert rows[key] == "unknown (not recorded in the PEFT adapter)"


def test_eval_takes_an_adapter_folder(run_cart, engine, model_dir, tmp_path):
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "mine")
    q = tmp_path / "q.jsonl"
    q.write_bytes(orjson.dumps({"schema": "cart.questions/1", "id": "q1",
                                "question": "Where do ships dock?", "answers": ["bay seven"]}) + b"\n")
    proc = run_cart("eval", q, "-c", tmp_path / "mine", "-m", model_dir, "--max-new-tokens", 3,
                    "--summary", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [m["method"] for m in summary["methods"]] == ["mine"]


# -- composition: cart's rules, whatever the inputs' format ----------------------------------------
def test_compose_of_adapters_follows_carts_sink_and_position_rules(run_cart, engine, model_dir, tmp_path):
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "a", p=6, seed=1)
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "b", p=9, seed=2,
                      text="Meridian Falls has four bridges and a tram line.")
    for x in "ab":
        assert run_cart("convert", tmp_path / x, "-o", tmp_path / f"{x}.safetensors").returncode == 0
    proc = run_cart("compose", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "ab.safetensors")
    assert proc.returncode == 0, proc.stderr
    composed = Cartridge.load(tmp_path / "ab.safetensors")
    files = Cartridge.load(tmp_path / "a.safetensors"), Cartridge.load(tmp_path / "b.safetensors")
    want = compose_parts([("a", files[0], ""), ("b", files[1], "")])
    for x, y in zip(composed.tensors().values(), want.tensors().values()):
        assert torch.equal(x, y)
    # one sink (b's dropped), queries at the largest part's p -- not PEFT's rule
    assert (composed.num_tokens, composed.num_frozen, composed.query_position) == (6 + 8, 1, 9)
    # PEFT's compose_cartridge_adapters keeps every token (cart's --sinks all) and puts queries
    # after all of them (p = 15): the same K/V, another query position
    compose_cartridge_adapters([tmp_path / "a", tmp_path / "b"], output_path=tmp_path / "peft-ab")
    theirs = Cartridge.load(tmp_path / "peft-ab", engine.identity)
    all_sinks = compose_parts([("a", files[0], ""), ("b", files[1], "")], sinks="all")
    for i in range(theirs.num_layers):
        for x, y in zip(theirs.layer(i), all_sinks.layer(i)):
            assert torch.equal(x, y)
    assert (theirs.num_tokens, theirs.num_frozen, theirs.query_position) == (15, 1, 15)
    assert all_sinks.query_position == 9


# -- refusals, in one line, outputs untouched ---------------------------------------------------------
@pytest.fixture
def outputs(tmp_path, engine):
    """An existing cartridge file and adapter folder a refused run must leave as they are."""
    make_cartridge(engine, p=5).save(tmp_path / "old.safetensors")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text("{}")
    return tmp_path / "old.safetensors", tmp_path / "old"


def refused(run_cart, outputs, *args):
    """Run ``cart convert ARGS -o OUT`` onto the existing output of its kind (a cartridge file
    for --to cart, an adapter folder for --to peft): it fails in one line and the output keeps
    its bytes. Returns the line."""
    out = outputs[0] if args[args.index("--to") + 1] == "cart" else outputs[1]
    before = snapshot(out)
    line = one_line_error(run_cart("convert", *args, "-o", out))
    assert snapshot(out) == before
    return line


def test_a_lora_adapter_is_refused(run_cart, engine, model_dir, tmp_path, outputs):
    lora = get_peft_model(base_model(model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    for to in ("cart", "peft"):
        assert refused(run_cart, outputs, tmp_path / "lora", "--to", to) == (
            f"cart: error: {tmp_path / 'lora'}: a PEFT LORA adapter, not a cartridge (cart reads "
            "PEFT adapters of peft_type CARTRIDGE)")
    assert one_line_error(run_cart("info", tmp_path / "lora")).endswith("a PEFT LORA adapter, not a "
                                                                        "cartridge (cart reads PEFT "
                                                                        "adapters of peft_type CARTRIDGE)")


def test_an_adapter_without_weights_is_refused(run_cart, engine, model_dir, tmp_path, outputs):
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    assert refused(run_cart, outputs, tmp_path / "ad", "--to", "cart") == (
        f"cart: error: {tmp_path / 'ad'}: PEFT adapter folder without adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_model.bin").write_bytes(b"pickle")
    assert refused(run_cart, outputs, tmp_path / "ad", "--to", "cart") == (
        f"cart: error: {tmp_path / 'ad'}: holds adapter_model.bin (a pickle, which cart never "
        "loads), not adapter_model.safetensors: re-save it with PEFT's save_pretrained(..., "
        "safe_serialization=True)")


def test_mismatched_shapes_are_refused(run_cart, engine, model_dir, tmp_path, outputs):
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "ad", p=10)
    config_path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_virtual_tokens": 12}))
    assert refused(run_cart, outputs, tmp_path / "ad", "--to", "cart") == (
        f"cart: error: {tmp_path / 'ad'}: prompt_embeddings has shape [10, 128], but "
        "adapter_config.json says [12, 128] (num_virtual_tokens 12, num_layers 2 x 2 x token_dim 32)")
    config_path.write_text(json.dumps({**config, "num_layers": 3}))  # and what the model has
    assert refused(run_cart, outputs, tmp_path / "ad", "--to", "cart") == (
        f"cart: error: {tmp_path / 'ad'}: prompt_embeddings has shape [10, 128], but "
        "adapter_config.json says [10, 192] (num_virtual_tokens 10, num_layers 3 x 2 x token_dim 32)")


def test_an_adapter_for_another_model_is_refused(run_cart, engine, model_dir, other_tiny_model,
                                                 tmp_path, outputs):
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "ad")
    other = other_tiny_model.name
    line = (f"cart: error: {tmp_path / 'ad'}: a PEFT adapter for base model "
            f"{resolve_model(str(model_dir)).path}, not {other}")
    for to in ("cart", "peft"):
        assert refused(run_cart, outputs, tmp_path / "ad", "--to", to,
                       "--model", other_tiny_model) == line
    assert one_line_error(run_cart("info", tmp_path / "ad", "--model", other_tiny_model)) == line
    # a base model cart cannot find is refused too, unless --model names it
    config_path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "acme/missing-model"}))
    assert one_line_error(run_cart("info", tmp_path / "ad", "--model", model_dir)) == (
        f"cart: error: {tmp_path / 'ad'}: a PEFT adapter for base model acme/missing-model (not "
        f"found locally), not {model_dir.name}; if it is that model, convert it with cart convert "
        f"{tmp_path / 'ad'} --model MODEL -o FILE")
    assert one_line_error(run_cart("info", tmp_path / "ad")) == (
        f"cart: error: {tmp_path / 'ad'}: the PEFT adapter's base model acme/missing-model is not "
        f"found locally: give --model (e.g. cart convert {tmp_path / 'ad'} --model MODEL -o FILE)")
    proc = run_cart("convert", tmp_path / "ad", "--model", model_dir, "-o", tmp_path / "c.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert read_metadata(tmp_path / "c.safetensors")["init"]["identity"] == "--model"


def test_a_cartridge_for_another_model_is_not_exported(run_cart, engine, other_tiny_model, tmp_path):
    make_cartridge(engine).save(tmp_path / "c.safetensors")
    err = one_line_error(run_cart("convert", tmp_path / "c.safetensors", "-o", tmp_path / "ad",
                                  "--model", other_tiny_model))
    assert err.startswith(f"cart: error: {tmp_path / 'c.safetensors'}: trained for model ")
    assert not (tmp_path / "ad").exists()


def test_queries_elsewhere_are_moved_where_peft_starts_them(run_cart, engine, model_dir, tmp_path):
    """A composed cartridge (queries at 9 < p) and a uniformly compacted one (queries after the
    corpus, > p; the rectangular kind PEFT can hold) export with every key moved by RoPE to
    queries at p: PEFT then gives the logits cart's engine gives with the original."""
    from cart.compact import CompactConfig, compact_ids
    from cart.io import Console

    a, b = make_cartridge(engine, p=5), make_cartridge(engine, p=9)
    composed = compose_parts([("a", a, ""), ("b", b, "")])
    corpus = engine.tokenizer(TEXT * 3, add_special_tokens=False).input_ids
    compacted = compact_ids(engine.model, engine.tokenizer, corpus, CompactConfig(tokens=10, budget="uniform"),
                            Console(True))
    compacted.metadata.update(make_cartridge(engine).metadata, query_position=compacted.query_position)
    assert composed.query_position == 9 < 13 and compacted.query_position > len(corpus)
    for name, cart in (("ab", composed), ("am", compacted)):
        cart.save(tmp_path / f"{name}.safetensors")
        proc = run_cart("convert", tmp_path / f"{name}.safetensors", "--to", "peft", "-o",
                        tmp_path / name, "--model", model_dir)
        assert proc.returncode == 0, proc.stderr.decode()
        pm = PeftModel.from_pretrained(base_model(model_dir), str(tmp_path / name)).eval()
        for text in PROMPTS:
            ids = engine.tokenizer(text).input_ids
            assert float((cart_logits(engine, cart, ids) - peft_logits(pm, ids)).abs().max()) <= TOL
        back = Cartridge.load(tmp_path / name)
        assert back.query_position == back.num_tokens == cart.num_tokens
        assert all(torch.equal(x, y) for x, y in zip(back.values, cart.values))


def test_what_peft_cannot_reproduce_is_not_exported(run_cart, engine, tmp_path, outputs):
    biased = make_cartridge(engine, p=5)
    biased.biases = [torch.zeros(biased.kv_heads, 5) for _ in range(biased.num_layers)]
    biased.save(tmp_path / "biased.safetensors")
    assert refused(run_cart, outputs, tmp_path / "biased.safetensors", "--to", "peft") == (
        f"cart: error: {tmp_path / 'biased.safetensors'}: carries per-key attention biases "
        "(cart.cartridge/2), which a PEFT cartridge cannot hold: not converted")


def test_bad_folders_and_outputs_are_refused(run_cart, engine, tmp_path):
    (tmp_path / "empty").mkdir()
    assert one_line_error(run_cart("convert", tmp_path / "empty", "-o", tmp_path / "x.safetensors")) == (
        f"cart: error: {tmp_path / 'empty'}: is a directory, not a cartridge file or a PEFT adapter "
        "folder (no adapter_config.json)")
    make_cartridge(engine).save(tmp_path / "c.safetensors")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert one_line_error(run_cart("convert", tmp_path / "c.safetensors", "-o", tmp_path / "mine")) == (
        f"cart: error: -o {tmp_path / 'mine'}: exists and is not a PEFT adapter folder (no "
        "adapter_config.json); choose another output folder")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert one_line_error(run_cart("convert", tmp_path / "c.safetensors")) == (
        "cart: error: no output: give -o DIR (a PEFT adapter is a folder)")
    assert one_line_error(run_cart("convert", tmp_path / "c.safetensors", "--to", "onnx", "-o",
                                   tmp_path / "y")) == (
        "cart: error: --to must be one of peft, cart, got 'onnx'")


def test_an_existing_adapter_folder_is_replaced_whole(run_cart, engine, tmp_path):
    make_cartridge(engine, p=5).save(tmp_path / "c5.safetensors")
    make_cartridge(engine, p=9).save(tmp_path / "c9.safetensors")
    assert run_cart("convert", tmp_path / "c9.safetensors", "-o", tmp_path / "ad").returncode == 0
    (tmp_path / "ad" / "README.md").write_text("stale")
    assert run_cart("convert", tmp_path / "c5.safetensors", "-o", tmp_path / "ad").returncode == 0
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert read_metadata(tmp_path / "ad")["p"] == 5
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left


def test_an_edited_exported_adapter_is_refused(engine, tmp_path):
    from safetensors.torch import load_file, save_file

    from cart.convert import convert

    make_cartridge(engine).save(tmp_path / "c.safetensors")
    convert(str(tmp_path / "c.safetensors"), str(tmp_path / "ad"))
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    from safetensors import safe_open
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    tensors["prompt_embeddings"][3, 5] += 1
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(CartError, match=r"ad: the tensors in adapter_model.safetensors do not match "
                                        r"the checksum in its cart metadata"):
        Cartridge.load(tmp_path / "ad")


def test_the_runtime_never_imports_peft(engine, model_dir, tmp_path):
    import subprocess
    import sys

    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "ad")
    code = ("import sys; from cart.cartridge import Cartridge; "
            f"Cartridge.load({str(tmp_path / 'ad')!r}); assert 'peft' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# -- the real model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_logits_agree_both_ways(tmp_path):
    from cart.convert import convert

    ref = resolve_model(None)
    engine = TransformersEngine.load(None)
    assert ModelIdentity.of(ref) == engine.identity
    # cart -> PEFT
    cart = make_cartridge(engine, p=16)
    cart.save(tmp_path / "c.safetensors")
    convert(str(tmp_path / "c.safetensors"), str(tmp_path / "ad"))
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == ref.path
    pm = PeftModel.from_pretrained(load_model(ref), str(tmp_path / "ad")).eval()
    # logits reach about 30 here: cart's attention kernel and transformers' sdpa round float32
    # differently at the 1e-6 relative level (measured: 3.6e-5 absolute)
    worst = assert_same_logits(engine, cart, pm, tol=1e-4)
    # PEFT -> cart
    pm2 = peft_made_adapter(ref.path, engine.tokenizer, tmp_path / "peft-ad", p=24)
    back = Cartridge.load(tmp_path / "peft-ad", engine.identity)
    assert back.metadata["init"]["identity"] == "base_model_name_or_path"
    worst = max(worst, assert_same_logits(engine, back, pm2, tol=1e-4))
    print(f"SmolLM2: max |logit difference| cart engine vs PEFT {worst:.3g}")


def test_the_store_serves_adapter_folders_inside_its_directory_only(engine, model_dir, tmp_path,
                                                                    caplog):
    d = tmp_path / "carts"
    d.mkdir()
    make_cartridge(engine).save(d / "file.safetensors")
    peft_made_adapter(model_dir, engine.tokenizer, d / "folder")
    (d / "notes").mkdir()  # a folder that is no adapter: not listed
    peft_made_adapter(model_dir, engine.tokenizer, tmp_path / "outside")
    os.symlink(tmp_path / "outside", d / "linked")  # a folder leading out: not served
    (d / "leaky").mkdir()  # an adapter whose weights lead out: rejected
    (d / "leaky" / "adapter_config.json").write_bytes(
        (tmp_path / "outside" / "adapter_config.json").read_bytes())
    os.symlink(tmp_path / "outside" / "adapter_model.safetensors",
               d / "leaky" / "adapter_model.safetensors")
    lora = get_peft_model(base_model(model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(d / "lora"))
    store = CartridgeStore(d, engine.identity)
    with caplog.at_level("WARNING", logger="cart.serve"):
        assert store.names() == ["file", "folder"]

    def why_unusable(name):  # what a request's 404 says
        with pytest.raises(UnknownCartridge) as e:
            store.entry(name)
        return str(e.value).removeprefix(f"cartridge {name!r} is unusable: ")

    rejected = {name: why_unusable(name) for name in ("lora", "leaky", "linked")}
    assert rejected["lora"] == ("lora: a PEFT LORA adapter, not a cartridge (cart reads PEFT "
                                "adapters of peft_type CARTRIDGE)")
    assert rejected["leaky"] == ("leaky/adapter_model.safetensors leads out of the cartridge "
                                 "directory (links out of it are not served)")
    assert rejected["linked"].startswith("a symbolic link that does not lead")
    assert store.entry("folder").cartridge.num_tokens == 10



def test_distill_continues_from_an_adapter_folder(run_cart, engine, model_dir, tmp_path):
    """distill --init takes a PEFT adapter folder as it takes a cartridge file (-p from it)."""
    from test_distill import convo_record, write_convos

    start = make_cartridge(engine)
    start.save(tmp_path / "start.safetensors")
    folder = tmp_path / "start-peft"
    assert run_cart("convert", tmp_path / "start.safetensors", "--to", "peft", "-o", folder,
                    "--model", model_dir).returncode == 0
    convos = write_convos(tmp_path / "convos.jsonl", [convo_record(
        engine.tokenizer, engine.identity, "Where do ships dock?", "At bay seven.")])
    out = tmp_path / "more.safetensors"
    proc = run_cart("distill", convos, "-m", model_dir, "--init", folder, "--steps", 2,
                    "--dtype", "float32", "-o", out)
    assert proc.returncode == 0, proc.stderr.decode()
    trained = Cartridge.load(out)
    assert trained.num_tokens == start.num_tokens and trained.query_position == 12
    assert trained.metadata["init"]["kind"] == "cartridge"
    assert trained.metadata["init"]["source"] == str(folder)
    assert any(not torch.equal(a, b) for a, b in zip(trained.keys, start.keys))
