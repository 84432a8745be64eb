"""Attention-matching compaction (cart.compaction, cart compact) and the per-key attention biases
it puts in cartridges: fit quality on held-out queries, biases in every engine, the file."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import one_line_error


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

    ref = resolve_model(str(tiny_model))
    tok = load_tokenizer(ref)
    model = load_model(ref)
    return model, tok, ModelIdentity.of(ref, model.config, tok)


def ids_of(tok, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, len(tok), (n - 1,), generator=gen).tolist()


class Recorder:
    """A ``cart_compaction`` stand-in: records each layer's queries and attends to the
    original prefix (the teacher's view of the same queries)."""

    def __init__(self, kv, valid):
        self.kv, self.valid, self.queries = kv, valid, []

    def fit(self, layer, query, scaling):
        from cart.attention import SharedPrefixes

        self.queries.append((query[0].detach().clone(), scaling))
        return SharedPrefixes([([0], self.kv, None)], 1)


def layer_queries(model, prefix_len: int, kv, query_ids):
    """Per layer, the queries ``[heads, L, d]`` of ``query_ids`` behind the original prefix."""
    from cart.attention import register

    rec = Recorder(kv, None)
    model.set_attn_implementation(register())
    with torch.no_grad():
        model.model(input_ids=torch.tensor([query_ids]),
                    position_ids=torch.arange(prefix_len, prefix_len + len(query_ids)).unsqueeze(0),
                    use_cache=False, cart_compaction=rec)
    return rec.queries


def prefix_attention(q, keys, values, scale, bias=None):
    """Per KV head: attention output over the prefix and its log-mass (for head group)."""
    heads, kv_heads = q.shape[0], keys.shape[0]
    group = heads // kv_heads
    outs, masses = [], []
    for h in range(heads):
        s = q[h].float() @ keys[h // group].float().T * scale
        if bias is not None:
            s = s + bias[h // group]
        outs.append(torch.softmax(s, -1) @ values[h // group].float())
        masses.append(torch.logsumexp(s, -1))
    return torch.stack(outs), torch.stack(masses)


def test_compaction_reproduces_attention_on_held_out_queries(tiny):
    """Per layer, held-out queries (not used in the fit) read nearly what they read from the
    whole prefix: the error falls as p grows and vanishes at p = T."""
    from cart.compaction import CompactionConfig, compact
    from cart.kvcache import prefix_kv

    model, tok, _ = tiny
    prefix = ids_of(tok, 48, 0)
    kv = prefix_kv(model, torch.tensor(prefix))
    train = [ids_of(tok, 200, 1)[1:], ids_of(tok, 120, 2)[1:]]
    held_out = ids_of(tok, 60, 3)[1:]
    queries = layer_queries(model, len(prefix), kv, held_out)
    errors = {}
    for p in (4, 12, 24, 48):
        cart = compact(model, prefix, train, CompactionConfig(tokens=p))
        assert cart.num_tokens == p and cart.query_position == len(prefix)
        worst = 0.0
        for layer, (q, scale) in enumerate(queries):
            ref_out, ref_mass = prefix_attention(q, *kv[layer], scale)
            k, v = cart.layer(layer)
            out, mass = prefix_attention(q, k, v, scale, cart.biases[layer])
            # what a query takes from the prefix: its output weighted by its share of mass
            err = ((out - ref_out).norm(dim=-1) / ref_out.norm(dim=-1).clamp_min(1e-6)).mean()
            worst = max(worst, float(err), float((mass - ref_mass).abs().mean()))
        errors[p] = worst
    assert errors[48] < 1e-3, errors
    assert errors[4] > errors[12] > errors[24] > errors[48], errors


def test_allocate_spends_the_budget_on_the_best_keys_over_the_whole_model():
    from cart.compaction import allocate

    scores = torch.zeros(2, 3, 6)  # [layers, kv_heads, T]
    scores[0, 1, 1:] = torch.tensor([0.9, 0.8, 0.7, 0.01, 0.02])
    scores[1, 2, 1:] = torch.tensor([0.6, 0.5, 0.03, 0.04, 0.05])
    scores[:, :, 0] = 1.0  # the sink: kept anyway, never counted
    counts = allocate(scores, 5)
    assert counts.tolist() == [[0, 3, 0], [0, 0, 2]]
    assert int(allocate(scores, 30).sum()) == 30 and allocate(scores, 30).max() == 5


def global_errors(model, tok, prefix, train, held_out, budget):
    """Per p: the worst layer's error of held-out queries' prefix attention (output and
    log-mass) with the compacted cartridge against the whole prefix."""
    from cart.compaction import CompactionConfig, compact
    from cart.kvcache import prefix_kv

    kv = prefix_kv(model, torch.tensor(prefix))
    queries = layer_queries(model, len(prefix), kv, held_out)
    errors = {}
    for p in (4, 12, 24, len(prefix)):
        cart = compact(model, prefix, train, CompactionConfig(tokens=p, budget=budget))
        assert cart.query_position == len(prefix)
        worst = 0.0
        for layer, (q, scale) in enumerate(queries):
            ref_out, ref_mass = prefix_attention(q, *kv[layer], scale)
            k, v = cart.layer(layer)
            out, mass = prefix_attention(q, k.expand(kv[layer][0].shape[0], -1, -1),
                                         v.expand(kv[layer][0].shape[0], -1, -1), scale,
                                         cart.biases[layer] if cart.biases is not None else None)
            err = ((out - ref_out).norm(dim=-1) / ref_out.norm(dim=-1).clamp_min(1e-6)).mean()
            worst = max(worst, float(err), float((mass - ref_mass).abs().mean()))
        errors[p] = worst
    return errors


def test_global_budget_reproduces_attention_on_held_out_queries(tiny):
    """A global budget: the same memory as p per head, shared out by attention; held-out
    queries read nearly what they read from the whole prefix, the error falling as p grows and
    vanishing at p = T (every head keeps every key)."""
    model, tok, _ = tiny
    prefix = ids_of(tok, 48, 0)
    train = [ids_of(tok, 200, 1)[1:], ids_of(tok, 120, 2)[1:]]
    errors = global_errors(model, tok, prefix, train, ids_of(tok, 60, 3)[1:], "global")
    assert errors[48] < 1e-3, errors
    assert errors[4] > errors[12] > errors[24] > errors[48], errors
    # one reference sequence: the corpus and it in one plain causal pass (no mask)
    errors = global_errors(model, tok, prefix, train[:1], ids_of(tok, 60, 3)[1:], "global")
    assert errors[48] < 1e-3 and errors[4] > errors[48], errors


def test_global_budget_is_a_flat_cartridge_of_the_uniform_memory(tiny):
    """Heads keep different numbers of keys (the sum is the uniform budget's), each kept key
    is one of its own head's corpus keys at its corpus position, sinks kept whole, and every
    head's keys are masked to its own queries."""
    from cart.compaction import CompactionConfig, compact
    from cart.kvcache import prefix_kv

    model, tok, _ = tiny
    prefix = ids_of(tok, 40, 4)
    kv = prefix_kv(model, torch.tensor(prefix))
    uniform = compact(model, prefix, [ids_of(tok, 80, 5)], CompactionConfig(tokens=10))
    flat = compact(model, prefix, [ids_of(tok, 80, 5)], CompactionConfig(tokens=10, budget="global"))
    assert flat.flat and flat.kv_bytes() == uniform.kv_bytes() and flat.num_tokens == 10
    heads = kv[0][0].shape[0]
    per_head = []
    for layer, (k, _) in enumerate(kv):
        keys, _ = flat.layer(layer)
        bias = flat.biases[layer]
        assert keys.shape[0] == 1 and bias.shape == (heads, keys.shape[1])
        for h in range(heads):
            own = torch.isfinite(bias[h])
            assert torch.equal(keys[0, h], k[h, 0]) and bool(own[h])  # head h's sink, column h
            per_head.append(int(own.sum()) - 1)
            for key in keys[0, own]:
                assert torch.isclose(k[h], key).all(dim=-1).any()
        assert int(torch.isfinite(bias).sum()) == keys.shape[1]  # each key serves one head
    assert sum(per_head) == len(kv) * heads * 9 and len(set(per_head)) > 1


def test_compaction_keeps_the_sink_and_corpus_positions(tiny):
    from cart.compaction import CompactionConfig, compact
    from cart.kvcache import prefix_kv

    model, tok, _ = tiny
    prefix = ids_of(tok, 40, 4)
    kv = prefix_kv(model, torch.tensor(prefix))
    cart = compact(model, prefix, [ids_of(tok, 80, 5)], CompactionConfig(tokens=10))
    for layer, (k, v) in enumerate(kv):
        assert torch.equal(cart.frozen_keys[layer], k[:, :1]) and torch.equal(cart.frozen_values[layer], v[:, :1])
        assert torch.all(cart.biases[layer][:, 0] == 0)
        # every kept key is one of the corpus's keys, unchanged (its position stays in it)
        for h in range(k.shape[0]):
            for key in cart.keys[layer][h]:
                assert torch.isclose(k[h], key).all(dim=-1).any()
    with pytest.raises(Exception, match="more than the corpus's 40 tokens"):
        compact(model, prefix, [ids_of(tok, 80, 5)], CompactionConfig(tokens=41))


def duplicated(cart, copies: dict[int, int]):
    """The cartridge without biases in which position j appears ``copies[j]`` times: exactly
    what a bias of log(copies[j]) on position j stands for."""
    from cart.cartridge import Cartridge

    order = [j for j in range(cart.num_tokens) for _ in range(copies.get(j, 1))]
    index = torch.tensor(order[1:])
    layers = [cart.layer(i) for i in range(cart.num_layers)]
    return Cartridge([k[:, :1] for k, _ in layers], [v[:, :1] for _, v in layers],
                     [k[:, index] for k, _ in layers], [v[:, index] for _, v in layers],
                     dict(cart.metadata))


@pytest.fixture(scope="module")
def biased_pair(tiny):
    """A cartridge with biases log 3 / log 2 on two positions, and its exact unbiased twin."""
    from cart.cartridge import Cartridge
    from cart.kvcache import cartridge_from_tokens

    model, tok, ident = tiny
    base = cartridge_from_tokens(model, torch.tensor(ids_of(tok, 10, 6)))
    copies = {2: 3, 7: 2}
    biases = []
    for _ in range(base.num_layers):
        b = torch.zeros(base.kv_heads, base.num_tokens)
        for j, n in copies.items():
            b[:, j] = math.log(n)
        biases.append(b)
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash, "query_position": 10}
    biased = Cartridge(base.frozen_keys, base.frozen_values, base.keys, base.values, md, biases)
    return biased, duplicated(biased, copies)


def test_bias_gives_the_same_logits_as_the_keys_it_stands_for(tiny, biased_pair):
    """transformers engine: scoring and batched generation after a biased cartridge equal the
    same after the unbiased cartridge that repeats those keys (both at query position 10)."""
    from cart.engines.base import GenerationRequest, KVPrefix, ScoreRequest
    from cart.engines.hf import TransformersEngine

    model, tok, ident = tiny
    engine = TransformersEngine(model, tok, ident)
    biased, twin = biased_pair
    assert twin.num_tokens == biased.num_tokens + 3 and twin.biases is None
    a, b = KVPrefix.of_cartridge(biased, "a"), KVPrefix.of_cartridge(twin, "b")
    assert a.query_position == b.query_position == 10
    prompts = [ids_of(tok, 9, 7)[1:], ids_of(tok, 14, 8)[1:]]
    sa = engine.score([ScoreRequest(p, 2, kv_prefix=a) for p in prompts])
    sb = engine.score([ScoreRequest(p, 2, kv_prefix=b) for p in prompts])
    for x, y in zip(sa, sb):
        assert x == pytest.approx(y, abs=1e-5)
    plain = engine.score([ScoreRequest(p, 2) for p in prompts])
    assert max(abs(x - y) for r, s in zip(sa, plain) for x, y in zip(r, s)) > 1e-3
    # a mixed batch: rows on the biased cartridge, its twin, and none
    reqs = [GenerationRequest(p, 6, top_k_logprobs=3, kv_prefix=kv)
            for p in prompts for kv in (a, b, None)]
    out = engine.generate(reqs, seed=0)
    for i in range(0, len(out), 3):
        assert out[i].token_ids == out[i + 1].token_ids
        for ta, tb in zip(out[i].topk, out[i + 1].topk):
            assert ta.logprobs == pytest.approx(tb.logprobs, abs=1e-5)


def test_bias_in_training_equals_the_keys_it_stands_for(tiny, biased_pair, tmp_path):
    """cart distill's forward pass (the loss of a packed batch) honours the biases too."""
    from cart.distill import Conversation, make_batch
    from cart.trainable import TrainableCartridge

    model, tok, _ = tiny
    biased, twin = biased_pair
    convos = [Conversation(str(i), ids_of(tok, 20, 10 + i), [5, 9, 15],
                           [[3, 4], [5, 6], [7, 8]], [[-0.5, -1.2], [-0.1, -2.5], [-0.7, -0.8]])
              for i in range(3)]
    batch = make_batch([[0, 1], [2]], convos, 10, tok.pad_token_id, "cpu")
    sums = [float(TrainableCartridge(c, model, "kl", "float32")(batch, 1.0)[1]) for c in (biased, twin)]
    assert sums[0] == pytest.approx(sums[1], rel=1e-5)


def test_biased_cartridge_file_round_trips_and_old_files_load(tmp_path, biased_pair):
    from cart.cartridge import Cartridge, read_metadata

    biased, twin = biased_pair
    path = tmp_path / "b.safetensors"
    biased.save(path)
    assert read_metadata(path)["format"] == "cart.cartridge/2"
    back = Cartridge.load(path)
    assert back.query_position == 10 and back.num_tokens == biased.num_tokens
    for x, y in zip(back.biases + back.keys + back.values, biased.biases + biased.keys + biased.values):
        assert torch.equal(x, y)
    old = tmp_path / "old.safetensors"
    twin.save(old)  # no biases: still written (and read) as format 1
    assert read_metadata(old)["format"] == "cart.cartridge/1"
    assert Cartridge.load(old).biases is None


def test_compose_keeps_biases(biased_pair, tmp_path):
    from cart.compose import compose_parts

    biased, twin = biased_pair
    both = compose_parts([("a", biased, "x"), ("b", twin, "y")])
    assert both.num_tokens == biased.num_tokens + twin.num_tokens - 1
    for i in range(both.num_layers):
        assert torch.equal(both.biases[i][:, :biased.num_tokens], biased.biases[i])
        assert torch.all(both.biases[i][:, biased.num_tokens:] == 0)
    assert compose_parts([("b", twin, "y"), ("b", twin, "y")]).biases is None


def test_vllm_engine_refuses_biases_in_one_line(biased_pair):
    from cart.engines.base import KVPrefix
    from cart.engines.vllm import BIAS_REFUSED, VLLMEngine
    from cart.io import CartError

    engine = VLLMEngine.__new__(VLLMEngine)  # refused before anything of vLLM is touched
    with pytest.raises(CartError) as e:
        engine.salt_of(KVPrefix.of_cartridge(biased_pair[0], "a"))
    assert str(e.value) == BIAS_REFUSED and "\n" not in BIAS_REFUSED


def test_windows_join_into_one_cartridge(tiny):
    """A corpus longer than a window: compacted window by window, joined with one sink; the
    queries start after the longest window's turn."""
    from cart.compact import CompactConfig, compact_ids, shares, window_bounds
    from cart.io import Console

    assert window_bounds(10, 4) == [(0, 3), (3, 7), (7, 10)]
    assert shares([30, 30, 40], 10) == [3, 3, 4] and sum(shares([7, 1, 1], 5)) == 5
    from tiny import TRAINING_TEXT

    model, tok, _ = tiny
    corpus = tok(TRAINING_TEXT * 3, add_special_tokens=False)["input_ids"]
    window = len(corpus) // 3 + 1
    cart = compact_ids(model, tok, corpus, CompactConfig(tokens=16, window=window, biases=True,
                                                         budget="uniform"), Console(True))
    assert cart.num_tokens == 16 and cart.metadata["init"]["windows"] == 3
    # queries start after a window's turn, not after the whole corpus
    assert cart.biases is not None and len(corpus) // 3 < cart.query_position < len(corpus)
    plain = compact_ids(model, tok, corpus, CompactConfig(tokens=16, window=window, budget="uniform"),
                        Console(True))
    assert plain.biases is None and plain.format == "cart.cartridge/1"  # uniform: no biases
    assert plain.query_position == cart.query_position
    # the default, a global budget: flat windows join into one flat cartridge of the same memory
    flat = compact_ids(model, tok, corpus, CompactConfig(tokens=16, window=window), Console(True))
    assert flat.flat and flat.kv_bytes() == plain.kv_bytes()
    assert flat.query_position == cart.query_position


def test_cart_compact_cli(run_cart, tiny_model, tmp_path):
    from cart.cartridge import Cartridge

    corpus = tmp_path / "c.md"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    out = tmp_path / "c.safetensors"
    proc = run_cart("compact", corpus, "-p", "8", "-o", out, "--model", tiny_model)
    assert proc.returncode == 0, proc.stderr.decode()
    cart = Cartridge.load(out)
    assert cart.num_tokens == 8 and cart.metadata["init"]["kind"] == "attention-match"
    assert cart.metadata["corpus_tokens"] > 8 and cart.query_position > 8
    # the default: a global budget, a flat cartridge with fitted biases
    assert cart.flat and cart.format == "cart.cartridge/3"
    assert cart.metadata["init"]["budget"] == "global" and cart.metadata["init"]["biases"] is True
    uniform = tmp_path / "uniform.safetensors"
    proc = run_cart("compact", corpus, "-p", "8", "--budget", "uniform", "-o", uniform,
                    "--model", tiny_model)
    assert proc.returncode == 0, proc.stderr.decode()
    plain = Cartridge.load(uniform)
    assert plain.biases is None and plain.metadata["init"]["biases"] is False
    assert plain.kv_bytes() == cart.kv_bytes()  # the same memory, shared out differently
    biased = tmp_path / "biased.safetensors"
    proc = run_cart("compact", corpus, "-p", "8", "--budget", "uniform", "--biases", "-o", biased,
                    "--model", tiny_model)
    assert proc.returncode == 0, proc.stderr.decode()
    assert Cartridge.load(biased).biases is not None
    proc = run_cart("compact", corpus, "-p", "8", "--budget", "even", "-o", out, "--model", tiny_model)
    assert one_line_error(proc) == "cart: error: --budget must be one of uniform, global, got 'even'"
    before = out.read_bytes()
    proc = run_cart("compact", corpus, "-p", "5000", "-o", out, "--model", tiny_model)
    assert one_line_error(proc).endswith("tokens (lower -p)") and out.read_bytes() == before
    proc = run_cart("compact", corpus, "-p", "1", "-o", out, "--model", tiny_model)
    assert one_line_error(proc) == "cart: error: -p/--tokens must be at least 2, got 1"


@pytest.mark.parametrize("fused", [True, False])
def test_attend_with_lse_is_softmax_attention_and_its_log_mass(fused):
    """Both ways (PyTorch's fused CPU kernel, plain maths for other devices): grouped heads,
    causal or a bool mask, against the softmax written out."""
    from cart.compaction import attend_with_lse

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 8, generator=gen) for h, n in ((6, 10), (2, 10), (2, 10)))
    full = q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    mask = torch.rand(1, 1, 10, 10, generator=gen) > 0.4
    mask[..., 0] = True  # every row sees something
    for kwargs, allowed in (({}, None), ({"causal": True}, causal), ({"mask": mask}, mask)):
        scores = full if allowed is None else full.masked_fill(~allowed, float("-inf"))
        out, lse = attend_with_lse(q, k, v, 0.3, fused=fused, **kwargs)
        assert out.shape == (1, 6, 10, 8) and lse.shape == (1, 6, 10)
        assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
        assert torch.allclose(out, torch.softmax(scores, -1) @ v.repeat_interleave(3, 1), atol=1e-5)


@pytest.mark.parametrize("select", ["max", "mean", "rms"])
def test_attention_targets_are_the_softmax_written_out(select):
    from cart.compaction import attention_targets

    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 30, 8, generator=gen) * 2, torch.randn(2, 30, 8, generator=gen)
    queries = torch.randn(2, 150, 8, generator=gen) * 2  # more than one block of 64
    got = attention_targets(keys, values, queries, 0.4, select)
    scores = queries @ keys.transpose(1, 2) * 0.4
    shift = scores.amax(-1, keepdim=True)
    weights = torch.softmax(scores, -1)
    rank = {"max": weights.amax(1), "mean": weights.mean(1), "rms": weights.square().mean(1).sqrt()}[select]
    rank[:, 0] = float("-inf")
    assert torch.allclose(got.shift, shift, atol=1e-5)
    assert torch.allclose(got.mass, (scores - shift).exp().sum(-1), rtol=1e-5)
    assert torch.allclose(got.sink, (scores[:, :, 0:1] - shift).exp().squeeze(-1), rtol=1e-4, atol=1e-7)
    assert torch.allclose(got.output, weights @ values, atol=1e-5)
    assert torch.allclose(got.rank, rank, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("sequences", [1, 2])
def test_global_budget_pass_computes_the_models_own_attention(tiny, sequences):
    """The global budget's pass computes each layer's attention itself (split softmax): the
    hidden states it leaves are the model's plain ones, one query sequence (causal) or several
    packed (masked)."""
    from cart.compaction import CompactionConfig, _Observer, _run_queries

    model, tok, _ = tiny
    prefix = ids_of(tok, 40, 0)
    queries = [ids_of(tok, 30, 1)[1:], ids_of(tok, 20, 2)[1:]][:sequences]
    seen = []
    hook = model.model.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state))
    try:
        _run_queries(model, len(prefix), queries, prefix_ids=prefix,
                     cart_observer=_Observer(len(prefix), CompactionConfig(tokens=8)))
    finally:
        hook.remove()
    with torch.no_grad():
        for n, seq in enumerate(queries):
            start = len(prefix) + sum(len(s) for s in queries[:n])
            plain = model.model(input_ids=torch.tensor([prefix + seq])).last_hidden_state
            assert torch.allclose(seen[0][0, start:start + len(seq)], plain[0, len(prefix):], atol=1e-4)
        assert torch.allclose(seen[0][0, :len(prefix)], plain[0, :len(prefix)], atol=1e-4)
