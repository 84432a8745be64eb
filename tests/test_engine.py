"""The transformers engine and the GQA attention on the tiny model: batching, padding and prefix
reuse change nothing; top-k log-probs are the model's raw next-token distribution."""

import pytest
import torch
from reference import assert_batched_equals_alone, kv_cache, next_token_logprobs

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
    assert_batched_equals_alone(engine, [GenerationRequest(p, 12, 0.0, top_k_logprobs=5) for p in prompts(engine)])


def test_topk_logprobs_are_the_raw_distribution_even_when_sampling(engine):
    p = prompts(engine)[0]
    (g,) = engine.generate([GenerationRequest(p, 6, 1.7, top_k_logprobs=4)], seed=3)
    seq = p + g.token_ids
    ref = next_token_logprobs(engine.model, seq)
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


def test_kv_prefix_equals_the_same_tokens_in_the_prompt(engine):
    """A KV prefix (what a cartridge is) of tokens X gives the generation and the scores of the
    prompt X + P, in a batch mixing prefixes of different lengths and no prefix."""
    from cart.engines.base import KVPrefix, ScoreRequest
    from cart.kvcache import prefix_kv

    ps = prompts(engine)
    x1, x2 = ps[2][:9], ps[0][:5]
    kv1 = KVPrefix("x1", prefix_kv(engine.model, torch.tensor(x1)), len(x1))
    kv2 = KVPrefix("x2", prefix_kv(engine.model, torch.tensor(x2)), len(x2))
    prefixed = [GenerationRequest(ps[1], 10, kv_prefix=kv1), GenerationRequest(ps[0], 10, kv_prefix=kv2),
                GenerationRequest(ps[1], 10)]
    inline = [GenerationRequest(x1 + ps[1], 10), GenerationRequest(x2 + ps[0], 10),
              GenerationRequest(ps[1], 10)]
    got = engine.generate(prefixed, seed=0)
    want = [engine.generate([r], seed=0)[0] for r in inline]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    # a shared prompt prefix after a KV prefix is cached per KV prefix and changes nothing
    shared = [GenerationRequest(ps[1], 10, prefix_len=3, kv_prefix=kv1)]
    assert engine.generate(shared, seed=0)[0].token_ids == got[0].token_ids
    # teacher-forced scores
    seq = ps[1]
    (lp,) = engine.score([ScoreRequest(seq, 4, kv_prefix=kv1)])
    ref = next_token_logprobs(engine.model, x1 + seq)
    expected = [float(ref[len(x1) + i - 1, seq[i]]) for i in range(4, len(seq))]
    torch.testing.assert_close(torch.tensor(lp), torch.tensor(expected), atol=1e-4, rtol=0)
    (lp2,) = engine.score([ScoreRequest(x1 + seq, len(x1) + 4, prefix_len=len(x1))])
    torch.testing.assert_close(torch.tensor(lp2), torch.tensor(expected), atol=1e-4, rtol=0)


def test_kv_prefix_with_its_own_query_position(engine):
    """A composed cartridge's queries start at ``query_position``, not at its length: the engine
    (generation, batched with other rows, and scores) equals a hand-written forward pass with
    those position ids."""
    from cart.engines.base import KVPrefix, ScoreRequest
    from cart.kvcache import prefix_kv

    ps = prompts(engine)
    x, y = ps[2][:9], ps[0][:7]
    kx, ky = prefix_kv(engine.model, torch.tensor(x)), prefix_kv(engine.model, torch.tensor(y))
    kv = [(torch.cat([a, b[:, 1:]], 1), torch.cat([c, d[:, 1:]], 1)) for (a, c), (b, d) in zip(kx, ky)]
    composed = KVPrefix("xy", kv, 9 + 6, query_position=9)
    prompt = ps[1]

    def manual_greedy(n):
        cache = kv_cache(engine.model, kv)
        ids, out = list(prompt), []
        with torch.no_grad():
            pos = torch.arange(9, 9 + len(ids)).unsqueeze(0)
            logits = engine.model(input_ids=torch.tensor([ids]), position_ids=pos,
                                  past_key_values=cache).logits[0, -1]
            for step in range(n):
                nxt = int(logits.argmax())
                out.append(nxt)
                logits = engine.model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                                      position_ids=torch.tensor([[9 + len(ids) + step]])).logits[0, -1]
        return out

    got = engine.generate([GenerationRequest(prompt, 8, kv_prefix=composed),
                           GenerationRequest(ps[2], 8)], seed=0)
    assert got[0].token_ids == manual_greedy(8)[:len(got[0].token_ids)]
    assert got[1].token_ids == engine.generate([GenerationRequest(ps[2], 8)], seed=0)[0].token_ids
    (lp,) = engine.score([ScoreRequest(prompt, 3, kv_prefix=composed)])
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt]), past_key_values=kv_cache(engine.model, kv),
                              position_ids=torch.arange(9, 9 + len(prompt)).unsqueeze(0)).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    expected = [float(ref[i - 1, prompt[i]]) for i in range(3, len(prompt))]
    torch.testing.assert_close(torch.tensor(lp), torch.tensor(expected), atol=1e-4, rtol=0)
    # and it differs from queries at the prefix's length (the position matters)
    (plain,) = engine.score([ScoreRequest(prompt, 3, kv_prefix=KVPrefix("xy2", kv, 15))])
    assert max(abs(a - b) for a, b in zip(plain, lp)) > 1e-4


def test_requests_joining_a_running_batch_equal_each_alone(engine):
    """Continuous batching (cart serve): requests join between decode steps, with different KV
    prefixes or none, and leave when done; every generation equals the request run alone, and
    the batch holds each shared prefix once, not once per row."""
    from cart.engines.base import KVPrefix
    from cart.kvcache import prefix_kv

    ps = prompts(engine)
    kv1 = KVPrefix("x1", prefix_kv(engine.model, torch.tensor(ps[2][:9])), 9)
    kv2 = KVPrefix("x2", prefix_kv(engine.model, torch.tensor(ps[0][:5])), 5, query_position=3)
    first = [GenerationRequest(ps[0], 9, kv_prefix=kv1), GenerationRequest(ps[1], 4)]
    later = [GenerationRequest(ps[1], 12, kv_prefix=kv1), GenerationRequest(ps[2], 7, kv_prefix=kv2),
             GenerationRequest(ps[2], 5, kv_prefix=kv1, ignore_eos=True)]
    batch = engine.open_batch()
    rows = batch.add(first, [0, 1])
    sizes = []
    with torch.inference_mode():
        for step in range(3):
            sizes.append(len(batch.step()))
        rows += batch.add(later, [2, 3, 4])
        # a row's own cache is its prompt and the tokens fed back: the prefix is not in it
        assert rows[0].length == len(ps[0]) + 3
        assert batch.mask.shape[1] == max(r.length for r in batch.rows)
        one_prefix = sum(k.numel() * k.element_size() * 2 for k, _ in engine.prefix_layers(kv1))
        own = sum(layer._k.numel() * layer._k.element_size() * 2 for layer in batch.cache.layers)
        # (+ the padded stack of the two cartridges: built by the batched prefill, kept by the batch)
        assert batch.kv_bytes() == own + one_prefix + sum(
            k.numel() * k.element_size() * 2 for k, _ in engine.prefix_layers(kv2)) + batch._groups.stacked_nbytes()
        while len(batch):
            sizes.append(len(batch.step()))
    assert sizes[:3] == [2, 2, 2] and max(sizes) == 5 and sizes[-1] < 5  # joined, then left
    for req, row in zip(first + later, rows):
        (alone,) = engine.generate([req], seed=0)
        assert row.out.token_ids == alone.token_ids
    assert len(rows[4].out.token_ids) == 5  # ignore_eos: always max_new_tokens


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    from cart.serve import TextStream

    class Tok:  # ids are bytes; decoding shows an incomplete UTF-8 character as U+FFFD
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    ts = TextStream(Tok(), ["END"])
    sent = [ts.push(b, eos=False) for b in "ab E".encode()]
    assert [d for d, _ in sent] == ["a", "b", " ", ""]  # "E" might start "END"
    assert ts.push(ord("x"), eos=False) == ("Ex", False)
    euro = "€".encode()
    assert ts.push(euro[0], eos=False) == ("", False) and ts.push(euro[1], eos=False) == ("", False)
    assert ts.push(euro[2], eos=False) == ("€", False)
    assert ts.push(ord("E"), eos=False) == ("", False)
    assert ts.push(ord("N"), eos=False) == ("", False)
    assert ts.push(ord("D"), eos=False) == ("", True)
    assert ts.text == "ab Ex€"
    done = TextStream(Tok(), [])
    assert done.push(ord("a"), eos=False) == ("a", False) and done.push(2, eos=True) == ("", False)


def test_scheduler_streams_tokens_and_isolates_a_failing_request(engine):
    """The decode thread of cart serve: tokens come back one event each, equal to a lone run; a
    request whose prefill fails gets an error and the others carry on."""
    import threading

    from cart.scheduler import Overloaded, Scheduler

    ps = prompts(engine)
    scheduler = Scheduler(engine, max_batch=2, max_pending=3)
    got: dict[int, list] = {0: [], 1: [], 2: []}
    finished = threading.Semaphore(0)

    def sink(i):
        def on_event(token, done, reason, error):
            got[i].append(error if error else token)
            if done:
                finished.release()
        return on_event

    good = [GenerationRequest(ps[0], 8), GenerationRequest(ps[1], 5)]
    scheduler.submit(good[0], 0, sink(0))
    scheduler.submit(GenerationRequest(ps[2], 0), 0, sink(1))  # max_new_tokens 0: refused by the engine
    scheduler.submit(good[1], 0, sink(2))
    with pytest.raises(Overloaded) as e:
        scheduler.submit(good[1], 0, sink(2))
    assert e.value.status == 429
    for _ in range(3):
        assert finished.acquire(timeout=60)
    assert got[0] == engine.generate([good[0]], seed=0)[0].token_ids
    assert got[2] == engine.generate([good[1]], seed=0)[0].token_ids
    assert len(got[1]) == 1 and "max_new_tokens" in got[1][0]
    scheduler.close(timeout=30)
    with pytest.raises(Overloaded) as e:
        scheduler.submit(good[1], 0, sink(2))
    assert e.value.status == 503


# -- sampling that no request can break (issue 15, item 1) ---------------------------------------
TINY_TEMPERATURES = [1e-40, 5e-324, 1e-300, 1e-30]


def test_tiny_temperatures_give_the_greedy_answer(engine):
    """softmax(logits / 1e-40) was NaN (inf / inf): the draw raised 'probability tensor
    contains either inf, nan or element < 0'. A tiny T is now the greedy choice."""
    p = prompts(engine)[0]
    (greedy,) = engine.generate([GenerationRequest(p, 10, 0.0, ignore_eos=True)], seed=0)
    for t in TINY_TEMPERATURES:
        (got,) = engine.generate([GenerationRequest(p, 10, t, ignore_eos=True)], seed=0)
        assert got.token_ids == greedy.token_ids, t


def test_eval_with_a_tiny_temperature_is_not_an_internal_error(run_cart, tiny_model, tmp_path):
    """`cart eval --temperature 1e-40` exited 70 (the NaN draw); it now answers greedily."""
    import json

    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"schema": "cart.questions/1", "id": "q1", "question": "Who founded it?",
                              "answers": ["Ilsa Voss"]}) + "\n")
    outs = {}
    for t in ("0", "1e-40"):
        proc = run_cart("eval", qs, "-m", tiny_model, "--no-context", "--temperature", t,
                        "--max-new-tokens", "6")
        assert proc.returncode == 0, proc.stderr.decode()
        outs[t] = [json.loads(line)["prediction"] for line in proc.stdout.splitlines()]
    assert outs["1e-40"] == outs["0"]


def test_sample_token_never_fails_on_finite_scores():
    """Property: any temperature in (0, 2], subnormal ones included, and scores with -inf
    entries (masked tokens) and ties: a token of maximal score at tiny T (unless scores differ by
    less than ~T), a token of finite score always, and no exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cart.engines.base import finite_rows, sample_token

    scores = st.lists(st.one_of(st.floats(-1e4, 1e4, width=32), st.just(float("-inf"))),
                      min_size=1, max_size=16).filter(lambda xs: max(xs) > float("-inf"))
    temps = st.one_of(st.floats(min_value=0.0, max_value=2.0, exclude_min=True, allow_subnormal=True),
                      st.sampled_from(TINY_TEMPERATURES))

    @settings(max_examples=2000, deadline=None, derandomize=True)
    @given(scores, temps, st.integers(0, 2**32))
    def check(xs, t, seed):
        logits = torch.tensor(xs, dtype=torch.float32)
        assert finite_rows(logits.unsqueeze(0)) == [True]
        token = sample_token(logits, t, torch.Generator().manual_seed(seed))
        assert 0 <= token < len(xs) and xs[token] > float("-inf")
        # float32's softmax gives 0 to a score 104 T or more below the maximum (exp < 1e-45):
        # at a T that is 0 in float32 the token is a maximal one, else at most ~104 T below it
        # (at a tiny T, that is the maximum unless the scores differ by less than ~T)
        t32, gap = float(torch.tensor(t, dtype=torch.float32)), float(logits.max() - logits[token])
        assert gap == 0 if t32 == 0 else gap / t32 <= 105

    check()


def nan_prefix(engine, tokens):
    """A KV prefix (a cartridge) whose values hold NaN, as a broken distillation once wrote."""
    from cart.engines.base import KVPrefix
    from cart.kvcache import prefix_kv

    kv = [(k, v.clone().fill_(float("nan"))) for k, v in prefix_kv(engine.model, torch.tensor(tokens))]
    return KVPrefix("nan", kv, len(tokens))


def test_a_nan_cartridge_fails_its_row_alone(engine):
    """A cartridge holding NaN gave NaN scores; the draw raised in the batch's step and every
    request of the batch failed. Now that row ends with an error event and the others' tokens
    are those of a lone run; engine.generate (eval, synth) refuses it with a one-line error."""
    from cart.io import CartError

    ps = prompts(engine)
    bad = GenerationRequest(ps[1], 8, 1.0, kv_prefix=nan_prefix(engine, ps[2][:6]))
    good = [GenerationRequest(ps[0], 8, 0.0), GenerationRequest(ps[1], 8, 1.0, seed=5)]
    alone = [engine.generate([r], seed=0)[0].token_ids for r in good]
    batch = engine.open_batch()
    rows = batch.add([good[0], bad, good[1]], [0, 1, 5])
    errors = []
    with torch.inference_mode():
        while len(batch):
            errors += [(ev.row, ev.error) for ev in batch.step() if ev.error]
    assert errors == [(rows[1], "the model's next-token scores are not finite (NaN or infinite): "
                                "the cartridge or the model holds NaN or infinite values")]
    assert [rows[0].out.token_ids, rows[2].out.token_ids] == alone
    with pytest.raises(CartError, match=r"^generation failed: the model's next-token scores are not finite"):
        engine.generate([good[0], bad], seed=0)


def test_scheduler_fails_only_the_nan_request(engine):
    """Through cart serve's decode thread: the NaN request gets its error, the one sharing its
    steps gets every token."""
    import threading

    from cart.scheduler import Scheduler

    ps = prompts(engine)
    scheduler = Scheduler(engine, max_batch=4)
    got: dict[int, list] = {0: [], 1: []}
    finished = threading.Semaphore(0)

    def sink(i):
        def on_event(token, done, reason, error):
            got[i].append(error if error else token)
            if done:
                finished.release()
        return on_event

    good = GenerationRequest(ps[0], 8)
    scheduler.submit(GenerationRequest(ps[1], 8, 1e-40, kv_prefix=nan_prefix(engine, ps[2][:6])), 0, sink(1))
    scheduler.submit(good, 0, sink(0))
    for _ in range(2):
        assert finished.acquire(timeout=60)
    scheduler.close(timeout=30)
    assert got[0] == engine.generate([good], seed=0)[0].token_ids
    assert got[1] == ["generation failed: the model's next-token scores are not finite (NaN or "
                      "infinite): the cartridge or the model holds NaN or infinite values"]
