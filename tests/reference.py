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


# per layer, per KV head (the tiny model: 2 layers, 2 KV heads): the positions a ragged flat
# cartridge keeps of a 12-position rectangular one, sink first
RAGGED = [[[0, 2, 3, 5, 9, 10], [0, 1]], [[0], [0, 1, 2, 3, 4, 6, 7, 11]]]


def flattened(rect, keep=None):
    """``rect``'s keys rearranged flat: per layer and head the positions ``keep[l][h]`` (sink
    first; default all), queries where ``rect``'s are."""
    from cart.cartridge import Cartridge, flat_layer

    layers = []
    for i in range(rect.num_layers):
        k, v = rect.layer(i)
        rows = keep[i] if keep else [list(range(rect.num_tokens))] * rect.kv_heads
        layers.append(flat_layer([k[h, ix] for h, ix in enumerate(rows)],
                                 [v[h, ix] for h, ix in enumerate(rows)],
                                 [rect.biases[i][h, ix] for h, ix in enumerate(rows)]))
    return Cartridge.from_flat_layers(layers, {**rect.metadata, "query_position": rect.query_position})


def padded(rect, keep):
    """``rect`` with -inf biases on every position ``keep`` drops: the rectangular equivalent of
    ``flattened(rect, keep)``."""
    from cart.cartridge import Cartridge

    biases = []
    for i, b in enumerate(rect.biases):
        b = torch.full_like(b, float("-inf"))
        for h, ix in enumerate(keep[i]):
            b[h, ix] = rect.biases[i][h, ix]
        biases.append(b)
    return Cartridge(rect.frozen_keys, rect.frozen_values, rect.keys, rect.values,
                     metadata=dict(rect.metadata), biases=biases)
