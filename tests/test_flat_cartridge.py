"""Flat (ragged) cartridges (cart.cartridge, format 3): one K/V row per layer shared by the KV
heads, biases that are -inf off each head's own keys. Served exactly by the transformers engine
(alone and batched with other cartridges), saved and loaded exactly, composed flat with flat,
refused in one line where they cannot be used."""

import pytest
import torch
from reference import RAGGED, assert_batched_equals_alone, flattened, padded
from safetensors.torch import save

from cart.cartridge import Cartridge, encode_metadata, flat_layer, read_metadata
from cart.compose import compose_parts
from cart.engines.base import GenerationRequest, KVPrefix, ScoreRequest
from cart.engines.hf import TransformersEngine
from cart.io import CartError
from cart.kvcache import cartridge_from_tokens

TEXT = "Meridian Falls has four bridges and a tram line. Captain Ilsa Voss founded the cooperative."
P = 12


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine.load(str(tiny_model))


def metadata(engine, **extra):
    ident = engine.identity
    return {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
            "tokenizer_hash": ident.tokenizer_hash, **extra}


def rectangular(engine, text=TEXT, p=P, biased=True, seed=0):
    """A rectangular cartridge of ``text``'s first p tokens, with random biases (sink's 0)."""
    ids = torch.tensor(engine.tokenizer(text).input_ids[:p])
    cart = cartridge_from_tokens(engine.model, ids, metadata=metadata(engine))
    biases = None
    if biased:
        g = torch.Generator().manual_seed(seed)
        biases = [torch.randn(cart.kv_heads, p, generator=g) * 0.5 for _ in range(cart.num_layers)]
        for b in biases:
            b[:, 0] = 0
    return Cartridge(cart.frozen_keys, cart.frozen_values, cart.keys, cart.values,
                     metadata=metadata(engine), biases=biases)


def prefix(cart, name):
    return KVPrefix.of_cartridge(cart, name)


def assert_same_in_engine(engine, a, b):
    """Scores and greedy generations (every next-token log-prob) behind ``a`` and ``b`` agree
    within 1e-5."""
    prompt = engine.tokenizer("Who founded the cooperative? Captain Ilsa").input_ids
    pa, pb = prefix(a, "a"), prefix(b, "b")
    sa, sb = engine.score([ScoreRequest(prompt, 1, kv_prefix=p) for p in (pa, pb)])
    torch.testing.assert_close(torch.tensor(sa), torch.tensor(sb), atol=1e-5, rtol=0)
    vocab = engine.model.config.vocab_size
    ga, gb = (engine.generate([GenerationRequest(prompt, 6, top_k_logprobs=vocab, kv_prefix=p,
                                                 ignore_eos=True)], seed=0)[0] for p in (pa, pb))
    assert ga.token_ids == gb.token_ids
    for x, y in zip(ga.topk, gb.topk):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    return sa


def test_flat_layer_puts_the_sinks_first_and_masks_other_heads():
    ks = [torch.randn(n, 4) for n in (2, 4, 1)]
    bs = [torch.randn(n) for n in (2, 4, 1)]
    k, v, b = flat_layer(ks, ks, bs)
    assert k.shape == v.shape == (1, 7, 4) and b.shape == (3, 7) and b.dtype == torch.float32
    assert torch.equal(k[0, :3], torch.stack([x[0] for x in ks]))
    assert torch.equal(k[0, 3:], torch.cat([ks[0][1:], ks[1][1:]]))
    own = [[0, 3], [1, 4, 5, 6], [2]]
    for h, cols in enumerate(own):
        assert torch.equal(b[h, cols], bs[h])
        assert torch.isneginf(b[h, [j for j in range(7) if j not in cols]]).all()


def test_a_flat_cartridge_equals_its_rectangular_self(engine):
    rect = rectangular(engine)
    flat = flattened(rect)
    assert flat.flat and not rect.flat
    assert (flat.kv_heads, flat.num_tokens, flat.num_frozen, flat.frozen_columns) == (2, P, 1, 2)
    assert flat.kv_bytes() == rect.kv_bytes() and flat.format == "cart.cartridge/3"
    assert flat.layer(0)[0].shape == (1, 2 * P, 16)
    assert_same_in_engine(engine, flat, rect)


def test_a_ragged_flat_cartridge_equals_the_rectangular_one_masked(engine):
    rect = rectangular(engine)
    flat, masked = flattened(rect, RAGGED), padded(rect, RAGGED)
    columns = [sum(len(ix) for ix in layer) for layer in RAGGED]  # 8 and 9
    assert [flat.frozen_columns + k.shape[1] for k in flat.keys] == columns
    assert flat.num_tokens == -(-sum(columns) // 4)  # H x layers
    assert flat.kv_bytes() == sum(columns) * 2 * 16 * 4
    scores = assert_same_in_engine(engine, flat, masked)
    full = engine.score([ScoreRequest(engine.tokenizer("Who founded the cooperative? Captain Ilsa")
                                      .input_ids, 1, kv_prefix=prefix(rect, "r"))])[0]
    assert max(abs(x - y) for x, y in zip(scores, full)) > 1e-3  # the dropped keys mattered


def test_flat_cartridges_batched_with_others_equal_each_alone(engine, monkeypatch):
    import cart.attention as attention_module

    rect = rectangular(engine)
    other = rectangular(engine, "The quick brown fox jumps over the lazy dog.", p=7, seed=1)
    plain = rectangular(engine, "Orbital freight ships dock at bay seven.", p=9, biased=False)
    chosen = [prefix(flattened(rect, RAGGED), "ragged"), prefix(other, "other"), None,
              prefix(flattened(other), "flat other"), prefix(plain, "plain")]
    chosen.append(chosen[0])
    stacked = []
    real = attention_module._pad_and_stack
    monkeypatch.setattr(attention_module, "_pad_and_stack",
                        lambda parts: stacked.append(real(parts)) or stacked[-1])
    tok = engine.tokenizer
    prompts = [tok(t).input_ids for t in ("Orbital freight ships", "The quick brown fox", "Numbers 0 1 2")]
    vocab = engine.model.config.vocab_size
    assert_batched_equals_alone(engine, [
        GenerationRequest(prompts[i % 3], 4 + i % 3, 0.0, top_k_logprobs=vocab, kv_prefix=p)
        for i, p in enumerate(chosen)])
    # mixed in a stack, the flat K/V are broadcast into every head's slot
    assert stacked and all(k.shape[1] == b.shape[1] == 2 for k, _, b in stacked)
    assert any(torch.equal(k[s, 0], k[s, 1]) for k, _, _ in stacked for s in range(k.shape[0]))


def test_save_and_load_a_flat_cartridge(engine, tmp_path):
    flat = flattened(rectangular(engine), RAGGED)
    path = tmp_path / "flat.safetensors"
    flat.save(path)
    md = read_metadata(path)
    assert md["format"] == "cart.cartridge/3"
    assert (md["p"], md["num_frozen_tokens"], md["kv_heads"]) == (flat.num_tokens, 1, 2)
    back = Cartridge.load(path, engine.identity)
    assert back.flat and back.kv_bytes() == flat.kv_bytes() == path.stat().st_size - _overhead(path, back)
    for x, y in zip(flat.tensors().values(), back.tensors().values()):
        assert torch.equal(x, y)
    from cart.info import cartridge_info, format_info

    info = cartridge_info(path)
    assert info["kv_bytes"] == flat.kv_bytes()
    assert (f"{flat.kv_bytes()} bytes (" in format_info(info) and f"for {flat.num_tokens} tokens per "
            "KV head and layer on average (flat; a sink per head)" in format_info(info))
    back.metadata["corpus_tokens"] = 1000
    back.save(path)
    info = cartridge_info(path)
    assert info["compression_ratio"] == round(info["corpus_kv_bytes"] / flat.kv_bytes(), 2)


def _overhead(path, cart):
    """The file's bytes that are not K/V: its header and its biases."""
    import struct

    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n + sum(b.numel() * 4 for b in cart.biases)


def test_formats_1_and_2_still_load(engine, tmp_path):
    for biased, fmt in ((False, "cart.cartridge/1"), (True, "cart.cartridge/2")):
        rect = rectangular(engine, biased=biased)
        rect.save(tmp_path / "r.safetensors")
        assert read_metadata(tmp_path / "r.safetensors")["format"] == fmt
        back = Cartridge.load(tmp_path / "r.safetensors", engine.identity)
        assert not back.flat and back.kv_bytes() == rect.kv_bytes() == P * 2 * 2 * 2 * 16 * 4
    masked = padded(rectangular(engine), RAGGED)  # -inf biases: allowed in format 2 too
    masked.save(tmp_path / "m.safetensors")
    back = Cartridge.load(tmp_path / "m.safetensors")
    assert back.format == "cart.cartridge/2" and all(map(torch.equal, back.biases, masked.biases))


def _write(path, cart, change=None, **md):
    """``cart``'s file with its tensors changed by ``change`` (no checksum, as older files)."""
    tensors = cart.tensors()
    if change:
        change(tensors)
    path.write_bytes(save(tensors, metadata=encode_metadata({**cart.full_metadata(), **md})))
    return path


def _set(name, index, value):
    def change(tensors):
        tensors[name][index] = value
    return change


@pytest.mark.parametrize("change, md, expected", [
    (_set("bias.0", (0, 0), float("nan")), {}, "tensor bias.0 holds NaN or infinite values"),
    (_set("bias.1", (1, 3), float("inf")), {}, "tensor bias.1 holds NaN or infinite values"),
    (_set("trainable.0.keys", (0, 1, 2), float("-inf")), {},
     "tensor trainable.0.keys holds NaN or infinite values"),
    (_set("bias.1", (0,), float("-inf")), {},
     "bias.1: row 0 is all -inf (KV head 0 would attend to no key)"),
    (lambda t: t.update({"bias.0": t["bias.0"][:, :-1].clone()}), {}, "bias.0: shape (2, 7) is not [2, 8]"),
    (lambda t: t.update({"frozen.1.keys": t["frozen.1.keys"][:, :1].clone(),
                         "frozen.1.values": t["frozen.1.values"][:, :1].clone()}), {},
     "frozen tensors differ in token count: [1, 2]"),
    (None, {"p": 3}, "tensors do not match the metadata: p=5, frozen=1, layers=2, kv_heads=2, "
                     "head_dim=16, dtype=float32"),
    (None, {"format": "cart.cartridge/2"}, "format cart.cartridge/2 with the flat layout"),
])
def test_damaged_flat_files_are_refused_in_one_line(engine, tmp_path, change, md, expected):
    flat = flattened(rectangular(engine), RAGGED)
    path = _write(tmp_path / "bad.safetensors", flat, change, **md)
    with pytest.raises(CartError) as e:
        Cartridge.load(path, name="bad")
    assert str(e.value) == f"bad: corrupt cartridge file ({expected})"


def test_a_rectangular_file_calling_itself_flat_is_refused(engine, tmp_path):
    path = _write(tmp_path / "r.safetensors", rectangular(engine), format="cart.cartridge/3")
    with pytest.raises(CartError) as e:
        Cartridge.load(path, name="r")
    assert str(e.value) == "r: corrupt cartridge file (format cart.cartridge/3 without the flat layout)"


def test_minus_infinity_is_written_in_biases_only(engine, tmp_path):
    flat = flattened(rectangular(engine), RAGGED)
    flat.keys[1][0, 0, 0] = float("-inf")
    with pytest.raises(CartError) as e:
        flat.save(tmp_path / "x.safetensors")
    assert str(e.value) == (f"{tmp_path / 'x.safetensors'}: not written: tensor trainable.1.keys of "
                            "the cartridge holds NaN or infinite values")


def test_flat_cartridges_compose_layer_by_layer(engine):
    a = rectangular(engine)
    b = rectangular(engine, "The quick brown fox jumps over the lazy dog. The answer is forty two.", seed=3)
    keep_b = [[[0, 1, 4], [0, 6, 7, 8, 10]], [[0, 2, 3, 4, 5, 6, 7], [0, 11]]]
    fa, fb = flattened(a, RAGGED), flattened(b, keep_b)
    for sinks in ("one", "all"):
        both = compose_parts([("a", fa, "x"), ("b", fb, "y")], sinks)
        assert both.flat and both.query_position == P
        cut = 0 if sinks == "all" else 2
        for i in range(2):
            assert torch.equal(both.frozen_keys[i], fa.frozen_keys[i])
            assert torch.equal(both.keys[i], torch.cat([fa.keys[i], fb.layer(i)[0][:, cut:]], dim=1))
            assert torch.equal(both.values[i], torch.cat([fa.values[i], fb.layer(i)[1][:, cut:]], dim=1))
            assert torch.equal(both.biases[i], torch.cat([fa.biases[i], fb.biases[i][:, cut:]], dim=1))
    # the same as composing the rectangular equivalents: each head attends to its keys of both
    both = compose_parts([("a", fa, "x"), ("b", fb, "y")])
    masked = compose_parts([("a", padded(a, RAGGED), "x"), ("b", padded(b, keep_b), "y")])
    assert_same_in_engine(engine, both, masked)


def test_flat_and_rectangular_do_not_compose(engine):
    rect = rectangular(engine)
    with pytest.raises(CartError) as e:
        compose_parts([("a.safetensors", flattened(rect), "x"), ("b.safetensors", rect, "y")])
    assert str(e.value) == ("b.safetensors: a rectangular cartridge cannot be composed with flat "
                            "a.safetensors: compose flat cartridges only with flat ones")
    with pytest.raises(CartError) as e:
        compose_parts([("a.safetensors", rect, "x"), ("b.safetensors", flattened(rect), "y")])
    assert str(e.value) == ("b.safetensors: a flat (ragged) cartridge cannot be composed with "
                            "rectangular a.safetensors: compose flat cartridges only with flat ones")


def test_vllm_and_peft_refuse_a_flat_cartridge_in_one_line(engine):
    from cart.engines.vllm import BIAS_REFUSED, VLLMEngine
    from cart.peft_adapter import check_exportable

    flat = flattened(rectangular(engine), RAGGED)
    vllm = VLLMEngine.__new__(VLLMEngine)  # refused before anything of vLLM is touched
    with pytest.raises(CartError) as e:
        vllm.salt_of(prefix(flat, "f"))
    assert str(e.value) == BIAS_REFUSED == (
        "the vLLM engine cannot apply a cartridge's per-key attention biases (formats "
        "cart.cartridge/2 and /3, made by compaction): use --engine transformers")
    with pytest.raises(CartError) as e:
        check_exportable(flat, "f")
    assert str(e.value) == ("f: carries per-key attention biases (cart.cartridge/3), which a PEFT "
                            "cartridge cannot hold: not converted")


def test_eval_reports_a_flat_cartridges_memory_exactly(engine, tmp_path):
    from cart.eval import build_methods, summarize

    flat = flattened(rectangular(engine), RAGGED)
    flat.save(tmp_path / "flat.safetensors")
    (method,) = build_methods(engine, no_context=False, icl=[], truncate=[],
                              cartridges=[str(tmp_path / "flat.safetensors")])
    rows = [{"score": 1.0, "metric": "exact", "answer_tokens": 2, "answer_nll": 0.5}]
    stats = [{"generated_tokens": 2, "generation_seconds": 1.0, "seconds": 1.0}]
    per_token = 2 * 2 * 2 * 16 * 2  # layers x K,V x kv heads x head dim x bfloat16
    got = summarize(method, rows, stats, per_token, 100, 2)
    assert method.kv_tokens == flat.num_tokens == 5  # ceil(17 columns / (2 heads x 2 layers))
    assert got["kv_bytes"] == flat.kv_bytes("bfloat16") == 17 * 2 * 16 * 2  # not 5 x 2 x 2 columns
    assert got["compression_vs_icl"] == round(100 * per_token / got["kv_bytes"], 2)


def test_auto_engine_serves_biased_cartridges_with_transformers(engine, tmp_path):
    """On a GPU ``--engine auto`` means vLLM, which refuses attention biases: with cartridges
    that carry them (compacted: formats 2 and 3) it means transformers."""
    from cart.cartridge import has_biases
    from cart.engines import resolve_runtime

    rect = rectangular(engine, biased=False)
    flat = flattened(rectangular(engine), RAGGED)
    rect.save(tmp_path / "plain.safetensors")
    flat.save(tmp_path / "flat.safetensors")
    assert has_biases(tmp_path / "flat.safetensors") and not has_biases(tmp_path / "plain.safetensors")
    assert not has_biases("-") and not has_biases(tmp_path / "missing.safetensors")
    assert resolve_runtime("auto", "auto", "cuda:0", biases=True) == ("transformers", "bfloat16")
    assert resolve_runtime("vllm", "auto", "cuda:0", biases=True)[0] == "vllm"  # asked for: refused later
    assert resolve_runtime("auto", "auto", "cpu", biases=False) == ("transformers", "float32")
