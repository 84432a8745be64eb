"""The transformers engine and the GQA attention on the tiny model: batching, padding and prefix
reuse change nothing; top-k log-probs are the model's raw next-token distribution."""

import pytest
import torch

from cart.attention import register
from cart.engines.base import GenerationRequest
from cart.engines.hf import TransformersEngine


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine.load(str(tiny_model))


def prompts(engine):
    tok = engine.tokenizer
    return [tok("Orbital freight ships dock at bay seven. Captain").input_ids,
            tok("The quick brown fox").input_ids,
            tok("Meridian Falls has four bridges and a tram line. The answer is forty two.").input_ids]


def test_gqa_attention_matches_sdpa_with_left_padding(engine):
    model = engine.model
    ids = prompts(engine)
    width = max(map(len, ids))
    x = torch.tensor([[2] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = {}
    for impl in ("sdpa", register()):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model(input_ids=x, attention_mask=mask, position_ids=pos).logits
    model.set_attn_implementation(register())
    keep = mask.bool()
    torch.testing.assert_close(outs["sdpa"][keep], outs[register()][keep], rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_single_requests(engine):
    reqs = [GenerationRequest(p, 12, 0.0, top_k_logprobs=5) for p in prompts(engine)]
    batched = engine.generate(reqs, seed=0)
    for req, got in zip(reqs, batched):
        (alone,) = engine.generate([req], seed=0)
        assert got.token_ids == alone.token_ids
        for a, b in zip(got.topk, alone.topk):
            assert a.ids == b.ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_topk_logprobs_are_the_raw_distribution_even_when_sampling(engine):
    p = prompts(engine)[0]
    (g,) = engine.generate([GenerationRequest(p, 6, 1.7, top_k_logprobs=4)], seed=3)
    seq = p + g.token_ids
    ref = engine.forward_logprobs(seq)
    for step, topk in enumerate(g.topk):
        row = ref[len(p) + step - 1]
        expected_lp, expected_ids = row.topk(4)
        assert topk.ids == expected_ids.tolist()
        torch.testing.assert_close(torch.tensor(topk.logprobs), expected_lp, atol=1e-4, rtol=0)


def test_shared_prefix_reuse_changes_nothing(engine):
    ps = prompts(engine)
    shared = ps[0][:5]
    reqs = [GenerationRequest(shared + p, 8, 0.0, top_k_logprobs=3, prefix_len=len(shared)) for p in ps]
    plain = [GenerationRequest(shared + p, 8, 0.0, top_k_logprobs=3) for p in ps]
    engine._prefixes.clear()
    a = engine.generate(reqs, seed=1)
    assert len(engine._prefixes) == 1
    b = engine.generate(plain, seed=1)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        for s, t in zip(x.topk, y.topk):
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(t.logprobs), atol=1e-5, rtol=0)


def test_sampling_is_reproducible_per_seed(engine):
    reqs = [GenerationRequest(p, 10, 1.0) for p in prompts(engine)]
    assert [g.token_ids for g in engine.generate(reqs, seed=7)] == \
        [g.token_ids for g in engine.generate(reqs, seed=7)]
    assert [g.token_ids for g in engine.generate(reqs, seed=7)] != \
        [g.token_ids for g in engine.generate(reqs, seed=8)]


def test_stops_at_eos_and_at_the_cap(engine):
    eos = engine.tokenizer.eos_token_id
    p = prompts(engine)[1]
    for g in engine.generate([GenerationRequest(p, 3, 0.0), GenerationRequest(p, 50, 0.0)], seed=0):
        assert g.finished == (g.token_ids[-1] == eos)
        assert len(g.token_ids) <= 50
    (short,) = engine.generate([GenerationRequest(p, 3, 0.0)], seed=0)
    assert len(short.token_ids) <= 3
