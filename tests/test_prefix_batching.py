"""Batches mixing several cartridges (shared KV prefixes) attend in one batched call per layer
(cart.attention): every row equals attention over [its prefix, its own tokens] and equals the
row run alone, padding keys get no probability, and the work per layer does not grow with the
number of distinct cartridges."""

from types import SimpleNamespace

import pytest
import torch

from cart.attention import SharedPrefixes, gqa_attention
from cart.engines.base import GenerationRequest, KVPrefix
from cart.engines.hf import TransformersEngine
from reference import assert_batched_equals_alone

KV_HEADS, HEADS, D, OWN = 2, 4, 8, 6


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine.load(str(tiny_model))


def cartridge(p: int, biased: bool, layers: int = 1):
    """Per-layer K/V ``[kv_heads, p, d]`` and biases ``[kv_heads, p]`` (or None), random."""
    kv = [(torch.randn(KV_HEADS, p, D), torch.randn(KV_HEADS, p, D)) for _ in range(layers)]
    return kv, [torch.randn(KV_HEADS, p) for _ in range(layers)] if biased else None


def own_inputs(b: int, n: int, lengths: list[int]):
    """Queries ``[B, heads, n, d]``, left-padded own K/V ``[B, kv_heads, OWN, d]`` and the bool
    mask ``[B, 1, n, OWN]`` (causal over each row's last ``lengths[r]`` columns)."""
    q = torch.randn(b, HEADS, n, D)
    k, v = torch.randn(b, KV_HEADS, OWN, D), torch.randn(b, KV_HEADS, OWN, D)
    col = torch.arange(OWN)
    mask = torch.stack([(col >= OWN - ln) & (col.unsqueeze(0) <= torch.arange(n).unsqueeze(1) + OWN - n)
                        for ln in lengths]).unsqueeze(1)
    return q, k, v, mask


def reference(q, k, v, mask, per_row, scale):
    """Attention of every row, head and query over [its prefix keys, its allowed own keys],
    written out one query at a time: ``[B, n, heads, d]``."""
    b, heads, n, _ = q.shape
    out = torch.empty(b, n, heads, q.shape[-1])
    for r in range(b):
        for h in range(heads):
            j = h // (heads // k.shape[1])
            for i in range(n):
                keys, vals = k[r, j][mask[r, 0, i]], v[r, j][mask[r, 0, i]]
                logits = keys @ q[r, h, i] * scale
                if per_row[r] is not None:
                    (pk, pv), bias = per_row[r]
                    shared = pk[j] @ q[r, h, i] * scale + (0 if bias is None else bias[j])
                    logits, vals = torch.cat([shared, logits]), torch.cat([pv[j], vals])
                out[r, i, h] = torch.softmax(logits, -1) @ vals
    return out


def attention(q, k, v, mask, prefixes):
    out, _ = gqa_attention(SimpleNamespace(layer_idx=0), q, k, v, mask, scaling=D ** -0.5,
                           cart_prefixes=prefixes)
    return out


def mixed_batch(n: int):
    """Six rows over three cartridges of different lengths (two biased) and one row on none;
    a group's rows are not adjacent. Returns (inputs, per-row prefix, SharedPrefixes)."""
    torch.manual_seed(0)
    carts = [cartridge(3, True), cartridge(7, False), cartridge(5, True)]
    rows = {0: [1, 4], 1: [0, 5], 2: [3]}  # cartridge -> rows; row 2 has none
    per_row = [None] * 6
    for c, rs in rows.items():
        for r in rs:
            per_row[r] = (carts[c][0][0], None if carts[c][1] is None else carts[c][1][0])
    prefixes = SharedPrefixes([(rs, *carts[c]) for c, rs in rows.items()], 6)
    return own_inputs(6, n, [6, 3, 4, 6, 5, 3]), per_row, prefixes


@pytest.mark.parametrize("n", [1, 3])
def test_a_mixed_batch_is_attention_over_each_rows_prefix_and_tokens(n):
    (q, k, v, mask), per_row, prefixes = mixed_batch(n)
    got = attention(q, k, v, mask, prefixes)
    torch.testing.assert_close(got, reference(q, k, v, mask, per_row, D ** -0.5), rtol=1e-5, atol=1e-5)
    for r in range(6):  # and each row alone: one group over it (the broadcast path) or none
        alone = None if per_row[r] is None else SharedPrefixes(
            [([0], [per_row[r][0]], None if per_row[r][1] is None else [per_row[r][1]])], 1)
        one = attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], mask[r:r + 1], alone)
        torch.testing.assert_close(got[r:r + 1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plain", [False, True])
def test_one_cartridge_is_read_in_place(plain):
    """One cartridge over the batch (with or without rows on none) is broadcast, not stacked
    or gathered, and still exact."""
    torch.manual_seed(1)
    (kv, bias) = cartridge(4, True)
    rows = [0, 2, 3] if plain else [0, 1, 2, 3]
    prefixes = SharedPrefixes([(rows, kv, bias)], 4)
    q, k, v, mask = own_inputs(4, 2, [6, 2, 5, 3])
    per_row = [(kv[0], bias[0]) if r in rows else None for r in range(4)]
    got = attention(q, k, v, mask, prefixes)
    torch.testing.assert_close(got, reference(q, k, v, mask, per_row, D ** -0.5), rtol=1e-5, atol=1e-5)
    assert prefixes._stack is None and prefixes.layer(0)[0].shape[0] == 1
    assert prefixes.layer(0)[0].data_ptr() == kv[0][0].data_ptr()  # the cartridge's own storage


def test_padding_keys_and_absent_prefixes_get_no_probability(monkeypatch):
    (q, k, v, mask), per_row, prefixes = mixed_batch(1)
    seen = []
    softmax = torch.softmax

    def spy(*args, **kwargs):
        seen.append(softmax(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(torch, "softmax", spy)
    attention(q, k, v, mask, prefixes)
    (probs,) = seen  # [B, kv_heads, group * n, p_max + OWN]
    p_max = 7
    for r, pre in enumerate(per_row):
        p = 0 if pre is None else pre[0][0].shape[-2]
        assert torch.all(probs[r, :, :, p:p_max] == 0), r  # padding (and no prefix at all): exactly 0
        assert torch.all(probs[r, :, :, :p] > 0)


def test_a_nan_cartridge_poisons_only_its_rows():
    (q, k, v, mask), per_row, prefixes = mixed_batch(1)
    want = reference(q, k, v, mask, per_row, D ** -0.5)
    _, kv, _ = prefixes.groups[1]  # rows 0 and 5
    bad = [(kk, vv.clone().fill_(float("nan"))) for kk, vv in kv]
    groups = [(rows.tolist(), bad if i == 1 else kv_, b) for i, (rows, kv_, b) in enumerate(prefixes.groups)]
    got = attention(q, k, v, mask, SharedPrefixes(groups, 6))
    assert torch.isnan(got[[0, 5]]).all()
    fine = [1, 2, 3, 4]
    torch.testing.assert_close(got[fine], want[fine], rtol=1e-5, atol=1e-5)


def count_ops(monkeypatch, run):
    """(torch.matmul calls, torch.softmax calls) while ``run()`` runs."""
    counts = {"matmul": 0, "softmax": 0}
    for name in counts:
        real = getattr(torch, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted)
    run()
    monkeypatch.undo()
    return counts["matmul"], counts["softmax"]


def test_the_work_per_layer_does_not_grow_with_the_number_of_cartridges(monkeypatch):
    """No Python loop over cartridges: the same batch over 2 or 8 distinct cartridges (and
    rows on none) makes the same tensor calls, one softmax."""
    torch.manual_seed(2)
    q, k, v, mask = own_inputs(8, 1, [6, 5, 4, 3, 6, 5, 4, 3])
    calls = []
    for distinct in (2, 8):
        carts = [cartridge(2 + c, c % 2 == 0) for c in range(distinct)]
        groups = [([r for r in range(7) if r % distinct == c], *carts[c]) for c in range(distinct)]
        prefixes = SharedPrefixes([g for g in groups if g[0]], 8)
        calls.append(count_ops(monkeypatch, lambda p=prefixes: attention(q, k, v, mask, p)))
    assert calls[0] == calls[1] and calls[0][1] == 1


def tiny_cartridges(engine):
    """Six KV prefixes of different lengths (the second and the fifth with biases) over the
    tiny model."""
    from cart.kvcache import prefix_kv

    tok = engine.tokenizer
    texts = ["Meridian Falls has four bridges and a tram line.", "Captain Ilsa Voss",
             "The quick brown fox jumps over the lazy dog. The answer is forty two.",
             "Cargo manifests list ore, ice and seeds.", "Dock 7", "Numbers 3 5 8 13 21 34 55"]
    out = []
    for i, text in enumerate(texts):
        ids = tok(text).input_ids
        kv = prefix_kv(engine.model, torch.tensor(ids))
        ramp = torch.linspace(-1.0, 0.5, len(ids))
        bias = [ramp.expand(k.shape[0], -1).clone() for k, _ in kv] if i in (1, 4) else None
        out.append(KVPrefix(f"c{i}", kv, len(ids), bias=bias))
    return out


def test_mixed_cartridges_in_the_engine_equal_each_alone(engine, monkeypatch):
    """Through the engine: rows on six distinct cartridges (two biased, all of different
    lengths), one cartridge shared by two rows, and two rows on none decode together with the
    tokens and the whole next-token distribution (every log-prob of the vocabulary, within 1e-5
    in float32) of each run alone, with one softmax per layer per step whatever the number of
    cartridges."""
    c = tiny_cartridges(engine)
    tok = engine.tokenizer
    prompts = [tok(t).input_ids for t in ("Orbital freight ships", "The quick brown fox", "Numbers 0 1 2")]
    vocab = engine.model.config.vocab_size
    chosen = [c[0], c[1], None, c[2], c[0], c[3], c[4], None, c[5]]
    assert len({id(p) for p in chosen if p is not None}) == 6
    assert_batched_equals_alone(engine, [
        GenerationRequest(prompts[i % 3], 5 + i % 4, 0.0, top_k_logprobs=vocab, kv_prefix=p)
        for i, p in enumerate(chosen)])

    layers = engine.model.config.num_hidden_layers
    for chosen in ([c[0], c[0], c[0], None], [c[0], c[1], c[2], None]):
        batch = engine.open_batch()
        batch.add([GenerationRequest(prompts[i % 3], 4, kv_prefix=p) for i, p in enumerate(chosen)], [0] * 4)
        with torch.inference_mode():
            _, softmaxes = count_ops(monkeypatch, batch.step)
        assert softmaxes == layers


def test_a_running_batch_stacks_its_cartridges_once(engine, monkeypatch):
    """The padded stack is built once per layer for the batch's rows, kept across decode steps
    and as rows leave, not rebuilt every step."""
    import cart.attention as attention_module

    c = tiny_cartridges(engine)
    built = []
    real = attention_module._pad_and_stack
    monkeypatch.setattr(attention_module, "_pad_and_stack",
                        lambda parts: built.append(len(parts)) or real(parts))
    prompt = engine.tokenizer("Orbital freight ships").input_ids
    reqs = [GenerationRequest(prompt, n, kv_prefix=p, ignore_eos=True)
            for n, p in ((3, c[0]), (9, c[1]), (6, c[2]), (9, c[0]), (9, c[1]))]
    batch = engine.open_batch()
    batch.add(reqs, [0, 1, 2, 3, 4])
    with torch.inference_mode():
        batch.step()
        stacked = batch._groups.stacked_nbytes()
        assert stacked > 0 and batch.kv_bytes() > stacked  # the extra copy is accounted for
        while len(batch):
            batch.step()  # rows leave at steps 3 and 6: the stack stays
    assert built == [3] * engine.model.config.num_hidden_layers


@pytest.mark.parametrize("layout", ["one per row", "several rows each and rows on none"])
def test_every_layout_reads_the_stack_in_place(layout):
    """Whatever the rows' layout (a cartridge per row, several rows on each of several
    cartridges, rows on none), the prefix keys and values read are the stack itself (the
    queries are grouped by cartridge, no per-row copy of any cartridge), also after rows leave
    (the stack is kept, a cartridge gone leaves an unused slot), and exact."""
    torch.manual_seed(3)
    carts = [cartridge(3 + c, c % 2 == 1) for c in range(4)]
    on = [3, 2, 1, 0] if layout == "one per row" else [1, None, 3, 1, 0, 3, None, 1]
    groups = [([r for r, x in enumerate(on) if x == c], *carts[c]) for c in range(4)]
    first = SharedPrefixes([g for g in groups if g[0]], len(on))
    assert first.layer(0)[0].data_ptr() == first._stack.layer(0)[0].data_ptr()
    keep = [r for r, x in enumerate(on) if x != on[-1]]  # the rows on one cartridge leave
    later_on = [on[r] for r in keep]
    groups = [([r for r, x in enumerate(later_on) if x == c], *carts[c]) for c in range(4) if c != on[-1]]
    later = SharedPrefixes([g for g in groups if g[0]], len(keep), previous=first)
    assert later._stack is first._stack
    assert later.layer(0)[0].data_ptr() == first._stack.layer(0)[0].data_ptr()
    q, k, v, mask = own_inputs(len(keep), 2, [6, 4, 5, 3, 6, 2][:len(keep)])
    per_row = [None if c is None else (carts[c][0][0], None if carts[c][1] is None else carts[c][1][0])
               for c in later_on]
    got = attention(q, k, v, mask, later)
    torch.testing.assert_close(got, reference(q, k, v, mask, per_row, D ** -0.5), rtol=1e-5, atol=1e-5)
