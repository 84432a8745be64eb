"""Plain forward passes (a transformers cache, no cart engine) that tests check cart against."""

import torch


def kv_cache(model, kv):
    """A DynamicCache holding per-layer ``[kv_heads, n, head_dim]`` keys and values (a
    cartridge's, or ``cart.kvcache.prefix_kv``'s): the model attends to them as to n tokens
    before its input."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
    return cache


def cartridge_cache(model, cart):
    """``kv_cache`` of a cartridge (``cart.cartridge.Cartridge``): its keys and values, sink first."""
    return kv_cache(model, [cart.layer(i) for i in range(cart.num_layers)])


def next_token_logprobs(model, ids: list[int]):
    """Log-probs of the next token at every position of one unpadded sequence (``[T, vocab]``)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_batched_equals_alone(engine, requests, seed: int = 0):
    """``engine.generate`` of ``requests`` together gives each the tokens and top-k log-probs
    (the same ids, each id's value within 1e-5) of the request run alone. Ids are compared as
    sets: the order of near-ties (1e-7 apart on a random tiny model) may differ."""
    batched = engine.generate(requests, seed=seed)
    for req, got in zip(requests, batched):
        (alone,) = engine.generate([req], seed=seed)
        assert got.token_ids == alone.token_ids
        for a, b in zip(got.topk, alone.topk):
            assert sorted(a.ids) == sorted(b.ids)
            by_id = dict(zip(b.ids, b.logprobs))
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor([by_id[i] for i in a.ids]),
                                       atol=1e-5, rtol=0)
