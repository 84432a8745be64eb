"""The vLLM engine against the transformers engine, on CPU in fp32, eager: same teacher
log-probs (generation and prompt scoring), same greedy tokens after cartridges (one no token
sequence could produce, and a composed one), mixed batches equal to single requests, and
prefix-cache poisoning refused.

Needs vLLM (the CPU recipe: ``make test`` installs it). Without it these tests are skipped,
unless CART_REQUIRE_VLLM=1 (as in ``make test``), where a missing vLLM fails them.
"""

import pytest
import torch
from conftest import VLLM

from tiny import TRAINING_TEXT, build_tiny_model

pytestmark = VLLM

QUESTIONS = ["Where do ships dock?", "Who founded the cooperative?", "How many bridges?",
             "What is the answer?", "Say something about the fox."]
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model", seed=5,
                            init_range=0.3, head_dim=32)


@pytest.fixture(scope="module")
def engines(model_dir):
    from cart.engines import get_engine

    vllm_engine = get_engine("vllm", str(model_dir), top_k=32)
    hf_engine = get_engine("transformers", str(model_dir))
    yield vllm_engine, hf_engine
    vllm_engine.close()


def prompt(tok, question: str) -> list[int]:
    from cart.chat import render_ids

    return render_ids(tok, [{"role": "user", "content": question}], True)[0]


@pytest.fixture(scope="module")
def prefixes(engines):
    """KV prefixes: three cartridges initialised from text (different lengths), one of them
    noised (no token sequence produces it: like a trained cartridge), one spanning several
    KV blocks, and a composition of two (queries at its parts' position, not its length)."""
    from cart.compose import compose_parts
    from cart.engines.base import GenerationRequest, KVPrefix
    from cart.kvcache import cartridge_from_tokens

    vllm_engine, hf = engines
    ids = hf.tokenizer(TRAINING_TEXT * 8).input_ids
    block = vllm_engine.llm.vllm_config.cache_config.block_size

    def from_text(start, n):
        kv, _ = hf.prefill(GenerationRequest(ids[start:start + n], 1))
        return [(k[0], v[0]) for k, v in kv]

    gen = torch.Generator().manual_seed(0)
    plain = from_text(0, 12)
    noised = [(k + 0.5 * torch.randn(k.shape, generator=gen), v + 0.5 * torch.randn(v.shape, generator=gen))
              for k, v in from_text(20, 24)]
    carts = [cartridge_from_tokens(hf.model, torch.tensor(ids[s:s + n])) for s, n in ((40, 10), (60, 14))]
    composed = compose_parts([("a", carts[0], "a" * 64), ("b", carts[1], "b" * 64)])
    assert composed.query_position < composed.num_tokens  # the case that needs keys moved
    out = {
        "plain": KVPrefix("plain", plain, 12),
        "noised": KVPrefix("noised", noised, 24),
        "long": KVPrefix("long", from_text(0, 2 * block + 5), 2 * block + 5),
        "composed": KVPrefix.of_cartridge(composed, "a+b"),
    }
    return out


def requests(tok, kv_prefix=None, k=0, n=12):
    from cart.engines.base import GenerationRequest

    return [GenerationRequest(prompt(tok, q), n, top_k_logprobs=k, kv_prefix=kv_prefix) for q in QUESTIONS]


def assert_topk_close(a, b):
    """Same candidates with the same log-probs (candidates whose log-probs are within the
    tolerance of a neighbour may swap places)."""
    assert len(a) == len(b)
    for ta, tb in zip(a, b):
        assert len(ta.ids) == len(tb.ids)
        for i, (x, y) in enumerate(zip(ta.logprobs, tb.logprobs)):
            assert abs(x - y) < LOGPROB_TOL, (x, y)
            near_tie = any(abs(x - ta.logprobs[j]) < 2 * LOGPROB_TOL
                           for j in (i - 1, i + 1) if 0 <= j < len(ta.logprobs))
            assert ta.ids[i] == tb.ids[i] or near_tie


@pytest.mark.parametrize("k", [5, 32])  # 32 > vLLM's default max_logprobs of 20
@pytest.mark.parametrize("prefix", [None, "noised", "composed"])
def test_teacher_logprobs_equal_transformers(engines, prefixes, k, prefix):
    vllm_engine, hf = engines
    reqs = requests(hf.tokenizer, prefixes.get(prefix), k=k)
    ours, theirs = vllm_engine.generate(reqs, 0), hf.generate(reqs, 0)
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids and a.finished == b.finished
        assert len(a.topk) == len(a.token_ids)
        assert_topk_close(a.topk, b.topk)


@pytest.mark.parametrize("prefix", [None, "plain", "noised", "composed", "long"])
def test_scores_equal_transformers(engines, prefixes, prefix):
    from cart.engines.base import ScoreRequest

    vllm_engine, hf = engines
    tok = hf.tokenizer
    answers = hf.generate(requests(tok, prefixes.get(prefix)), 0)
    reqs = [ScoreRequest(prompt(tok, q) + g.token_ids, len(prompt(tok, q)), kv_prefix=prefixes.get(prefix))
            for q, g in zip(QUESTIONS, answers)]
    for _ in range(2):  # the second time the cartridge's blocks are in vLLM's prefix cache
        for a, b in zip(vllm_engine.score(reqs), hf.score(reqs)):
            assert len(a) == len(b) > 0
            assert max(abs(x - y) for x, y in zip(a, b)) < LOGPROB_TOL


def test_greedy_after_cartridges_identical_to_transformers(engines, prefixes):
    vllm_engine, hf = engines
    seen = {}
    for name in ("plain", "noised", "composed", "long"):
        reqs = requests(hf.tokenizer, prefixes[name], n=24)
        ours = [g.token_ids for g in vllm_engine.generate(reqs, 0)]
        assert ours == [g.token_ids for g in hf.generate(reqs, 0)], name
        seen[name] = ours
    bare = [g.token_ids for g in vllm_engine.generate(requests(hf.tokenizer, n=24), 0)]
    # each cartridge really was loaded: the answers depend on it
    assert len({tuple(map(tuple, v)) for v in [*seen.values(), bare]}) == 5


def test_mixed_batch_equals_single_requests(engines, prefixes):
    from cart.engines.base import GenerationRequest

    vllm_engine, hf = engines
    tok = hf.tokenizer
    names = [None, "plain", "noised", "composed", "long", "plain", None, "noised"]
    batch = [GenerationRequest(prompt(tok, QUESTIONS[i % len(QUESTIONS)]), 10 + i, top_k_logprobs=3,
                               kv_prefix=prefixes.get(n)) for i, n in enumerate(names)]
    together = vllm_engine.generate(batch, 0)
    for r, g in zip(batch, together):
        alone = vllm_engine.generate([r], 0)[0]
        assert g.token_ids == alone.token_ids
        assert_topk_close(g.topk, alone.topk)


def test_prefix_cache_poisoning_refused(engines, prefixes):
    """A request can share a cartridge's cached KV blocks only by loading that cartridge."""
    from vllm import SamplingParams

    from cart.engines.base import GenerationRequest

    vllm_engine, hf = engines
    tok = hf.tokenizer
    long_ = prefixes["long"]
    q = prompt(tok, QUESTIONS[0])
    # run it on the cartridge first: its placeholder blocks are now in the prefix cache
    on_cart = vllm_engine.generate([GenerationRequest(q, 16, kv_prefix=long_)], 0)[0].token_ids
    placeholders, transfer = vllm_engine.vllm_prompt(q, long_)
    salt = placeholders["cache_salt"]

    # 1. the engine refuses a request that carries the salt without loading the cartridge,
    #    or that loads it under another salt (its blocks would be cached where others read them)
    cases = [(dict(placeholders), None),
             ({"prompt_token_ids": placeholders["prompt_token_ids"]}, transfer),
             ({**placeholders, "cache_salt": salt[:-4] + "0000"}, transfer),
             (dict(placeholders), {**transfer, "tokens": long_.num_tokens - 1}),
             ({**placeholders, "prompt_token_ids": placeholders["prompt_token_ids"][1:]}, transfer)]
    for p, t in cases:
        params = SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": t} if t else None)
        with pytest.raises(ValueError, match="request refused"):
            vllm_engine.submit(p, params)

    # 2. past the engine (straight into vLLM), the connector refuses the same requests the
    #    prefix cache: they run on their own tokens, placeholders and all, with no cartridge
    expect = hf.generate([GenerationRequest(placeholders["prompt_token_ids"], 16)], 0)[0].token_ids
    assert expect != on_cart
    for p, t in cases[:2]:
        params = SamplingParams(max_tokens=16, temperature=0, detokenize=False,
                                stop_token_ids=sorted(vllm_engine.eos_token_ids),
                                extra_args={"kv_transfer_params": t} if t else None)
        rid = f"bypass-{len(p)}-{t is None}"
        vllm_engine.llm.add_request(rid, p, params)
        out = vllm_engine._run([rid])[rid]
        assert list(out.outputs[0].token_ids) == expect
    # and nothing was left behind: a plain request with the same tokens is not poisoned
    plain = vllm_engine.generate([GenerationRequest(placeholders["prompt_token_ids"], 16)], 0)[0]
    assert plain.token_ids == expect
    # while the cartridge, loaded properly, still answers as before
    assert vllm_engine.generate([GenerationRequest(q, 16, kv_prefix=long_)], 0)[0].token_ids == on_cart


def test_spool_file_lives_as_long_as_its_kv_prefix(engines, prefixes):
    import gc

    from cart.engines.base import GenerationRequest, KVPrefix

    vllm_engine, hf = engines
    plain = prefixes["plain"]
    twin = KVPrefix("twin", [(k.clone(), v.clone()) for k, v in plain.kv], plain.num_tokens)
    req = GenerationRequest(prompt(hf.tokenizer, QUESTIONS[0]), 4, kv_prefix=twin)
    assert vllm_engine.generate([req], 0)[0].token_ids == vllm_engine.generate(
        [GenerationRequest(req.prompt_ids, 4, kv_prefix=plain)], 0)[0].token_ids
    salt = vllm_engine.salt_of(twin)
    assert salt == vllm_engine.salt_of(plain)  # same content, same salt, one file
    path = vllm_engine.spool / f"{salt}.safetensors"
    del twin, req
    gc.collect()
    assert path.exists()  # `plain` still uses it
    other = KVPrefix("other", [(k + 1, v) for k, v in plain.kv], plain.num_tokens)
    other_path = vllm_engine.spool / f"{vllm_engine.salt_of(other)}.safetensors"
    assert other_path.exists() and other_path != path
    del other
    gc.collect()
    assert not other_path.exists()


def test_preempted_requests_load_their_cartridge_again(model_dir, engines, prefixes):
    """A request preempted for lack of KV blocks loses them; when it resumes the connector
    loads its cartridge again (here with vLLM's prefix cache off, so nothing else restores it)."""
    from cart.engines.base import GenerationRequest
    from cart.engines.vllm import VLLMEngine

    _, hf = engines
    small = VLLMEngine.load(str(model_dir), max_model_len=256, engine_args={
        "num_gpu_blocks_override": 10, "block_size": 32, "enable_prefix_caching": False})
    try:
        reqs = [GenerationRequest(prompt(hf.tokenizer, QUESTIONS[i]), 100, ignore_eos=True,
                                  kv_prefix=prefixes[name])
                for i, name in enumerate(("plain", "noised", "composed", "noised"))]
        ours = small.generate(reqs, 0)
        preemptions = sum(m.value for m in small.llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        small.close()
    assert preemptions > 0  # 4 requests of 5 blocks each, 10 blocks in all
    assert [g.token_ids for g in ours] == [g.token_ids for g in hf.generate(reqs, 0)]


def _records(data: bytes):
    import orjson

    return [orjson.loads(line) for line in data.splitlines()]


def test_synth_cli_on_vllm_matches_transformers(run_cart, run_cart_subprocess, model_dir, tmp_path):
    """`cart synth --engine vllm`, run as a user runs it: greedy conversations token for token
    the transformers engine's, teacher top-k log-probs within the tolerance (rounded to 1e-6 in
    the records; k = 32 needs vLLM's max_logprobs raised), the engine recorded in the config."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TRAINING_TEXT * 6)
    chunks = tmp_path / "chunks.jsonl"
    assert run_cart("chunk", corpus, "-n", "2", "--min-tokens", "40", "--max-tokens", "80",
                    "--model", model_dir, "-o", chunks).returncode == 0
    args = ("synth", chunks, "-n", "4", "--seed", "0", "--max-tokens-a", "12", "--max-tokens-b", "16",
            "--temperature-a", "0", "--temperature-b", "0", "--top-k", "32", "--logprob-mass", "1",
            "--batch-size", "4", "--model", model_dir)
    theirs = run_cart(*args)
    # the vLLM run in a process of its own (vLLM sets process-wide state: threads, logging)
    ours = run_cart_subprocess(*args, "--engine", "vllm", "-o", tmp_path / "convos.jsonl")
    assert theirs.returncode == 0 and ours.returncode == 0, ours.stderr.decode()
    a, b = _records((tmp_path / "convos.jsonl").read_bytes()), _records(theirs.stdout)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["config"]["engine"] == "vllm" and y["config"]["engine"] == "transformers"
        assert x["token_ids"] == y["token_ids"] and x["messages"] == y["messages"]
        tx, ty = x["targets"], y["targets"]
        assert tx["positions"] == ty["positions"]
        for ids_x, lps_x, ids_y, lps_y in zip(tx["ids"], tx["logprobs"], ty["ids"], ty["logprobs"]):
            # (the records keep candidates up to --logprob-mass 1: where the sum of probabilities
            # reaches 1 in floating point, which may differ by a candidate)
            assert abs(len(ids_x) - len(ids_y)) <= 1 and ids_x[0] == ids_y[0]
            assert max(abs(p - q) for p, q in zip(lps_x, lps_y)) < LOGPROB_TOL


def test_eval_cli_on_vllm_matches_transformers(run_cart, run_cart_subprocess, model_dir, tmp_path):
    """`cart eval --engine vllm`: the same answers and log-likelihoods as the transformers
    engine, for no context, ICL and a cartridge."""
    import orjson

    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model
    from cart.kvcache import cartridge_from_tokens

    ref = resolve_model(str(model_dir))
    model, tok, ident = load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)
    corpus = tmp_path / "corpus.md"
    corpus.write_text(TRAINING_TEXT)
    ids = tok(TRAINING_TEXT, add_special_tokens=False).input_ids
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash, "corpus_tokens": len(ids)}
    cartridge_from_tokens(model, torch.tensor(ids[:16]), metadata=md).save(tmp_path / "c.safetensors")
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b"".join(orjson.dumps(
        {"schema": "cart.questions/1", "id": f"q{i}", "question": q, "answers": ["bay seven"]}) + b"\n"
        for i, q in enumerate(QUESTIONS)))
    args = ("eval", questions, "-m", model_dir, "--no-context", "--icl", corpus, "-c",
            tmp_path / "c.safetensors", "--max-new-tokens", "12")
    theirs, ours = run_cart(*args), run_cart_subprocess(*args, "--engine", "vllm")
    assert theirs.returncode == 0 and ours.returncode == 0, ours.stderr.decode()
    a, b = _records(ours.stdout), _records(theirs.stdout)
    assert len(a) == len(b) == 3 * len(QUESTIONS)
    for x, y in zip(a, b):
        assert (x["method"], x["id"], x["prediction"]) == (y["method"], y["id"], y["prediction"])
        assert abs(x["answer_nll"] - y["answer_nll"]) < 1e-3
