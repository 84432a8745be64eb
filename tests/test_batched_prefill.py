"""Batched prefill (issue 16): ``TransformersBatch.add`` runs its newcomers in one left-padded
forward pass -- rows of different lengths, on different cartridges or none, with stored shared
prompt prefixes of different lengths or none -- or in one pass per sub-batch of at most
``prefill_tokens`` padded tokens, and every row equals the request run alone."""

import pytest
import torch
from reference import assert_batched_equals_alone

from cart.engines.base import GenerationRequest, KVPrefix
from cart.engines.hf import TransformersEngine


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = TransformersEngine.load(str(tiny_model))
    engine.prefill_pads = True  # as on a GPU: this CPU's default pads nothing (tested below)
    return engine


def cartridges(engine):
    """Two KV prefixes of different lengths, the second with biases."""
    from cart.kvcache import prefix_kv

    out = []
    for i, text in enumerate(["Meridian Falls has four bridges and a tram line.", "Captain Ilsa Voss"]):
        ids = engine.tokenizer(text).input_ids
        kv = prefix_kv(engine.model, torch.tensor(ids))
        bias = [torch.linspace(-1.0, 0.5, len(ids)).expand(k.shape[0], -1).clone() for k, _ in kv] if i else None
        out.append(KVPrefix(f"c{i}", kv, len(ids), bias=bias))
    return out


def mixed_requests(engine):
    """Prompts of different lengths on two cartridges and none; four share stored prompt
    prefixes (two prefixes of different lengths, one behind a cartridge), the rest have none."""
    c0, c1 = cartridges(engine)
    tok = engine.tokenizer
    system = tok("You are a careful assistant. Answer briefly.").input_ids
    p = [tok(t).input_ids for t in ("Orbital freight ships dock at bay seven. Captain", "The quick brown fox",
                                    "Numbers 0 1 2", "Meridian Falls has four bridges and a tram line. The")]
    return [GenerationRequest(p[0], 6, top_k_logprobs=4, kv_prefix=c0),
            GenerationRequest(p[1], 6, top_k_logprobs=4),
            GenerationRequest(system + p[2], 6, top_k_logprobs=4, prefix_len=len(system)),
            GenerationRequest(p[2], 6, top_k_logprobs=4, kv_prefix=c1),
            GenerationRequest(system[:4] + p[3], 6, top_k_logprobs=4, prefix_len=4, kv_prefix=c1),
            GenerationRequest(system + p[1], 6, top_k_logprobs=4, prefix_len=len(system)),
            GenerationRequest(p[3], 6, top_k_logprobs=4, kv_prefix=c0),
            GenerationRequest(p[1][:2], 6, top_k_logprobs=4)]


def forward_calls(engine, monkeypatch):
    """Records ``(rows, new columns, past columns)`` of each forward pass of the model."""
    calls = []
    real = engine.model.forward

    def counted(*args, **kwargs):
        ids, past = kwargs["input_ids"], kwargs.get("past_key_values")
        calls.append((ids.shape[0], ids.shape[1], past.get_seq_length() if past is not None else 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counted)
    return calls


def test_one_pass_prefills_every_newcomer_as_alone(engine, monkeypatch):
    reqs = mixed_requests(engine)
    alone = []
    for r in reqs:  # each alone (this also stores the shared prompt prefixes)
        batch = engine.open_batch()
        batch.add([r], [0])
        alone.append(batch.logits[0])
    calls = forward_calls(engine, monkeypatch)
    batch = engine.open_batch()
    rows = batch.add(reqs, list(range(len(reqs))))
    assert len(calls) == 1 and calls[0][0] == len(reqs)  # one pass for all (the old code: one each)
    assert calls[0][2] > 0  # with the stored prompt prefixes in its past
    for i, want in enumerate(alone):
        torch.testing.assert_close(batch.logits[i], want, atol=1e-5, rtol=0)
    # the laid-out caches (stored prefix + prompt, right-aligned) are each row's own K/V
    width = batch.mask.shape[1]
    for i, (r, row) in enumerate(zip(reqs, rows)):
        kv, _ = engine.prefill(r)
        assert batch.mask[i].sum() == row.length == len(r.prompt_ids)
        for layer, (k, _) in zip(batch.cache.layers, kv):
            torch.testing.assert_close(layer.keys[i, :, width - row.length:], k[0], atol=1e-5, rtol=0)
    monkeypatch.undo()
    assert_batched_equals_alone(engine, reqs)


def test_newcomers_joining_a_running_batch_are_batched_and_equal_alone(engine, monkeypatch):
    reqs = mixed_requests(engine)
    batch = engine.open_batch()
    rows = batch.add(reqs[:3], [0, 1, 2])
    with torch.inference_mode():
        batch.step()
        calls = forward_calls(engine, monkeypatch)
        rows += batch.add(reqs[3:], [3, 4, 5, 6, 7])
        assert len(calls) == 1 and calls[0][0] == len(reqs) - 3
        monkeypatch.undo()
        while len(batch):
            batch.step()
    for r, row in zip(reqs, rows):  # greedy: the seeds do not matter
        assert row.out.token_ids == engine.generate([r], seed=0)[0].token_ids


@pytest.mark.parametrize("budget_rows", [1, 2, 3])
def test_the_token_budget_splits_the_newcomers(engine, monkeypatch, budget_rows):
    """At most ``prefill_tokens`` padded tokens per pass: prompts of one length L with a
    budget of k*L go k to a pass; a prompt longer than the budget goes alone; the results
    do not change."""
    tok = engine.tokenizer
    base = tok("Orbital freight ships dock at bay seven. Captain Ilsa Voss said").input_ids
    length = len(base)
    reqs = [GenerationRequest(base[i:] + base[:i], 5, top_k_logprobs=3) for i in range(6)]
    reqs.append(GenerationRequest(base * 4, 5, top_k_logprobs=3))  # longer than any budget here
    c0, _ = cartridges(engine)
    reqs[2].kv_prefix = c0
    alone = [engine.generate([r], seed=0)[0] for r in reqs]
    monkeypatch.setattr(engine, "prefill_tokens", budget_rows * length)
    calls = forward_calls(engine, monkeypatch)
    got = engine.generate(reqs, seed=0)
    prefill = [c for c in calls if c[1] > 1]
    assert sorted(b for b, _, _ in prefill) == [1] + [budget_rows] * (6 // budget_rows)
    assert all(b * (t + p) <= budget_rows * length for b, t, p in prefill if b > 1)
    for g, a in zip(got, alone):
        assert g.token_ids == a.token_ids
        for x, y in zip(g.topk, a.topk):
            assert x.ids == y.ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_a_refused_request_leaves_the_batch_as_it_was(engine):
    reqs = mixed_requests(engine)
    batch = engine.open_batch()
    batch.add(reqs[:2], [0, 1])
    before = (len(batch), batch.mask.clone(), batch.logits.clone())
    with pytest.raises(ValueError, match="max_new_tokens"):
        batch.add([reqs[2], GenerationRequest(reqs[3].prompt_ids, 0)], [2, 3])
    assert len(batch) == before[0] and torch.equal(batch.mask, before[1]) and torch.equal(batch.logits, before[2])


def test_on_a_cpu_only_rows_of_the_same_lengths_share_a_pass(tiny_model, monkeypatch):
    """A CPU's default: no padding (it would cost its share of the time), so rows of different
    lengths go in passes of their own and rows of the same lengths go together."""
    engine = TransformersEngine.load(str(tiny_model))
    assert not engine.prefill_pads
    reqs = mixed_requests(engine)
    same = [GenerationRequest(list(r.prompt_ids), 4) for r in reqs[:3]] * 2
    reqs += same
    engine.generate(reqs, seed=0)  # stores the shared prompt prefixes
    calls = forward_calls(engine, monkeypatch)
    engine.open_batch().add(reqs, list(range(len(reqs))))
    shapes = {(len(r.prompt_ids) - engine._stored_prefix_len(r), engine._stored_prefix_len(r)) for r in reqs}
    assert len(calls) == len(shapes) < len(reqs)
    monkeypatch.undo()
    assert_batched_equals_alone(engine, reqs)
