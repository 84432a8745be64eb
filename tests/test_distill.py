"""cart distill on the tiny model: objective, packing, gradients, sink, resume, DDP, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch

from conftest import CART, one_line_error

FACT_Q = "What is the secret code?"
FACT_A = "The answer is forty two."


# -- building conversations by hand -------------------------------------------------------------
def _identity(model_dir):
    from cart.models import ModelIdentity, load_config, load_tokenizer, resolve_model

    ref = resolve_model(str(model_dir))
    tok = load_tokenizer(ref)
    return ref, tok, ModelIdentity.of(ref, load_config(ref), tok)


def convo_record(tok, identity, question: str, answer: str, index: int = 0, teacher=None,
                 head: list[int] | None = None) -> dict:
    """A cart.convo/1 record; targets one-hot on the answer (or from ``teacher(ids, pos)``)."""
    from cart.chat import render_ids
    from cart.io import schema_id

    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    ids, spans = render_ids(tok, [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer_ids}], False)
    start, end = spans[0]
    positions = list(range(start, end + 1))  # the answer and the end-of-turn token after it
    cand_ids, cand_lps = [], []
    for pos in positions:
        if teacher is None:
            cand_ids.append([ids[pos]])
            cand_lps.append([0.0])
        else:
            c, lp = teacher(ids, pos)
            cand_ids.append(c)
            cand_lps.append(lp)
    record = {"schema": schema_id("convo"), "id": f"convo-test-{index:06d}", "index": index,
              "run": "test", "messages": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}],
              "token_ids": ids, "targets": {"positions": positions, "ids": cand_ids,
                                            "logprobs": cand_lps},
              "model": {"id": identity.model_id, "config_hash": identity.config_hash,
                        "tokenizer_hash": identity.tokenizer_hash},
              "corpus": {"hash": "feedfacecafebeef", "n_tokens": 500, "n_documents": 1},
              "chunk": {"id": "chunk-x", "n_tokens": 10, "paths": ["corpus.txt"]}}
    if head is not None:
        record["corpus_head"] = {"ids": head, "source": "corpus"}
    return record


def random_teacher(seed: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)

    def teacher(ids, pos):
        logits = torch.randn(vocab, generator=gen)
        lp = torch.log_softmax(logits, -1)
        top = lp.topk(4)
        return top.indices.tolist(), [round(x, 6) for x in top.values.tolist()]

    return teacher


@pytest.fixture(scope="module")
def tiny(tiny_model):
    ref, tok, identity = _identity(tiny_model)
    head = tok("Orbital freight ships dock at bay seven. " * 8, add_special_tokens=False)["input_ids"]
    return tiny_model, tok, identity, head


def write_convos(path: Path, records) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


@pytest.fixture
def convos(tmp_path, tiny):
    model_dir, tok, identity, head = tiny
    teacher = random_teacher(0, len(tok))
    qs = ["Where do ships dock?", "Who founded the cooperative?", "How many bridges?",
          "What is the tram line?", "Name a number.", "What year?"]
    records = [convo_record(tok, identity, q, f"The answer is {n}.", i, teacher,
                            head=head if i == 0 else None)
               for i, (q, n) in enumerate(zip(qs, ["seven", "Voss", "four", "blue", "nine", "2091"]))]
    return write_convos(tmp_path / "convos.jsonl", records)


def env_for(cart_home):
    env = {**os.environ, "CART_HOME": str(cart_home)}
    env.pop("CART_DEBUG", None)
    return env


def load(path):
    from cart.cartridge import Cartridge

    return Cartridge.load(path)


# -- the objective and packing -----------------------------------------------------------------
def trainable(tiny, convos, p: int, objective: str = "kl"):
    """(model, tokenizer, conversations, module) with a corpus-initialised cartridge of p."""
    from cart.distill import DistillConfig, initial_cartridge, load_conversations
    from cart.trainable import TrainableCartridge
    from cart.io import Console
    from cart.models import load_model, resolve_model

    model_dir, tok, identity, head = tiny
    model = load_model(resolve_model(str(model_dir)))
    model.set_attn_implementation("sdpa")
    data = load_conversations([str(convos)])
    cart, info = initial_cartridge(DistillConfig(tokens=p, init="corpus"), data, model, tok, identity,
                                   Console(True))
    assert info["kind"] == "corpus"
    return model, tok, data, TrainableCartridge(cart, model, objective, "float32")


def test_packed_loss_equals_full_sequence_reference(tiny, convos):
    """A cartridge made from the first p head tokens + a packed batch gives the same loss as the
    model reading head + conversation as one sequence (positions, mask and targets right)."""
    from cart.distill import make_batch

    p, head = 12, tiny[3]
    model, tok, data, module = trainable(tiny, convos, p)
    packed = make_batch([[0, 1, 2], [3, 4], [5]], data.convos, p, tok.pad_token_id, "cpu")
    loss, loss_sum, kl_sum = module(packed, 1.0)
    ref_sum = ref_kl = 0.0
    with torch.no_grad():
        for c in data.convos:
            logits = model(input_ids=torch.tensor([head[:p] + c.token_ids])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            for pos, ids, lps in zip(c.positions, c.cand_ids, c.cand_logprobs):
                q = torch.tensor(lps, dtype=torch.float64).exp()
                q = (q / q.sum()).float()
                student = logp[p + pos - 1, ids]
                ref_sum += float(-(q * student).sum())
                ref_kl += float((q * (q.log() - student)).sum())
    assert loss_sum == pytest.approx(ref_sum, rel=1e-4)
    assert kl_sum == pytest.approx(ref_kl, rel=1e-3, abs=1e-3)
    # one conversation per row (padding) gives the same sums
    padded = make_batch([[i] for i in range(6)], data.convos, p, tok.pad_token_id, "cpu")
    _, pad_sum, _ = module(padded, 1.0)
    assert pad_sum == pytest.approx(ref_sum, rel=1e-4)


def test_only_the_cartridge_receives_gradients(tiny, convos):
    from cart.distill import make_batch

    model, tok, data, module = trainable(tiny, convos, 8)
    loss, _, _ = module(make_batch([[0, 1]], data.convos, 8, tok.pad_token_id, "cpu"), 0.1)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    params = list(module.parameters())
    assert len(params) == 2 * model.config.num_hidden_layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(not t.requires_grad for t in module.frozen_keys + module.frozen_values)
    assert [tuple(p.shape) for p in module.keys] == [(2, 7, 16)] * 2  # p-1 trainable positions


def test_ntp_objective_is_cross_entropy_of_the_conversation(tiny, convos):
    from cart.distill import make_batch

    head = tiny[3]
    model, tok, data, module = trainable(tiny, convos, 8, "ntp")
    _, ntp_sum, _ = module(make_batch([[0]], data.convos, 8, tok.pad_token_id, "cpu"), 1.0)
    c = data.convos[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([head[:8] + c.token_ids])).logits[0], -1)
    ref = -sum(float(logp[8 + pos - 1, c.token_ids[pos]]) for pos in c.positions)
    assert ntp_sum == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("objective", ["kl", "ntp"])
def test_chunked_loss_equals_all_targets_at_once(tiny, convos, objective):
    """The loss computed over the targets in chunks (each chunk's logits recomputed in the
    backward, not kept) gives the loss, the KL and the cartridge's gradients of one chunk."""
    from cart.distill import make_batch

    model, tok, data, module = trainable(tiny, convos, 8, objective)
    batch = make_batch([[0, 1, 2], [3, 4], [5]], data.convos, 8, tok.pad_token_id, "cpu")
    vocab = model.config.vocab_size
    assert module.loss_chunk >= batch.num_targets > 7 and batch.num_targets % 7  # 1; 7, the last short
    runs = []
    for chunk in (module.loss_chunk, 7):
        module.loss_chunk = chunk
        module.zero_grad(set_to_none=True)
        saved = []  # what autograd keeps for the backward, outside checkpointed chunks

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, loss_sum, kl_sum = module(batch, 0.1)
        loss.backward()
        logits_kept = any(len(shape) == 2 and shape[1] == vocab for shape in saved)
        runs.append((loss_sum, kl_sum, [p.grad.clone() for p in module.parameters()], logits_kept))
    (one_sum, one_kl, one_grads, one_kept), (sum_, kl, grads, kept) = runs
    assert one_kept and not kept  # chunked: no full-vocabulary logits wait for the backward
    assert loss_sum.dtype == torch.float32 and loss_sum.shape == () and not loss_sum.requires_grad
    assert float(sum_) == pytest.approx(float(one_sum), rel=1e-6)
    assert float(kl) == pytest.approx(float(one_kl), rel=1e-5, abs=1e-6)
    for a, b in zip(grads, one_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in grads)


def test_pack_and_plan():
    from cart.distill import DistillConfig, pack, plan_steps, split_step

    assert pack([0, 1, 2, 3], [5, 5, 12, 3], 10) == [[0, 1], [2], [3]]
    cfg = DistillConfig(tokens=4, batch_size=2, seq_len=10, epochs=2)
    steps = plan_steps([5, 5, 12, 3], cfg)
    rows = [r for s in steps for r in s]
    assert sorted(i for r in rows for i in r) == [0, 0, 1, 1, 2, 2, 3, 3]  # two epochs, all data
    longer = plan_steps([5, 5, 12, 3], DistillConfig(tokens=4, batch_size=2, seq_len=10, steps=5))
    assert longer[:2] == steps[:2] and len(longer) == 5  # --steps extends the same stream
    assert split_step([[0], [1], [2], [3], [4]], 2, 2) == [[[[0], [4]], [[1]]], [[[2]], [[3]]]]


# -- through the CLI -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory):
    """A tiny model whose weights are large enough (init std 0.2) to put most probability on
    one token: the default tiny model's near-uniform outputs cannot express a learnt fact."""
    from tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("sharp-tiny"), init_range=0.2)
    _, tok, identity = _identity(model_dir)
    head = tok("Orbital freight ships dock at bay seven. " * 8, add_special_tokens=False)["input_ids"]
    return model_dir, tok, identity, head


@pytest.mark.parametrize("init", ["corpus", "attention-match"])
def test_cli_learns_a_fact_and_keeps_the_sink(tmp_path, sharp_tiny, run_cart, init):
    """Distilled on one Q/A, the cartridge makes the model answer it; the sink is bit-identical
    to the initial one and the trainable part moved. From either start (attention-match is the
    default: its queries sit at the compacted corpus's query_position)."""
    from cart.distill import DistillConfig, initial_cartridge, load_conversations
    from cart.io import Console
    from cart.engines.base import GenerationRequest, KVPrefix
    from cart.engines.hf import TransformersEngine

    model_dir, tok, identity, head = sharp_tiny
    path = write_convos(tmp_path / "fact.jsonl", [convo_record(tok, identity, FACT_Q, FACT_A, head=head)])
    out = tmp_path / "fact.safetensors"
    chosen = [] if init == "attention-match" else ["--init", init]
    proc = run_cart("distill", path, "-m", model_dir, "-p", 8, "--steps", 100, "--lr", 0.2,
                    "--dtype", "float32", *chosen, "-o", out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"" and not (tmp_path / "fact.safetensors.ckpt").exists()
    trained = load(out)
    engine = TransformersEngine.load(str(model_dir))
    model = engine.model
    start, _ = initial_cartridge(DistillConfig(tokens=8, init=init),
                                 load_conversations([str(path)]), model, tok,
                                 identity, Console(True))
    for a, b in zip(trained.frozen_keys + trained.frozen_values, start.frozen_keys + start.frozen_values):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(trained.keys, start.keys))
    assert trained.query_position == start.query_position

    def answer(cart):
        from cart.chat import render_ids

        ids, _ = render_ids(tok, [{"role": "user", "content": FACT_Q}], True)
        prefix = None if cart is None else KVPrefix.of_cartridge(cart, "c")
        (out,) = engine.generate([GenerationRequest(ids, 12, kv_prefix=prefix)], seed=0)
        return tok.decode(out.token_ids, skip_special_tokens=True)

    assert "forty two" in answer(trained)
    assert "forty two" not in answer(start)
    assert "forty two" not in answer(None)
    md = trained.metadata
    assert md["init"]["kind"] == init and md["steps"] == 100 and md["loss"] < 1.0
    assert md["training"]["lr"] == 0.2 and md["corpus_hash"] == "feedfacecafebeef"


def test_cli_stdin_to_stdout_pipe(tiny, convos, run_cart_subprocess):
    """End to end: the real executable, conversations piped in, a cartridge piped out, and
    nothing on stderr from a fresh process (imports included)."""
    from cart.cartridge import Cartridge

    model_dir = tiny[0]
    proc = run_cart_subprocess("distill", "-m", model_dir, "-p", 6, "--steps", 2,
                               input=convos.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    cart = Cartridge.from_bytes(proc.stdout)
    assert cart.num_tokens == 6 and cart.metadata["steps"] == 2
    assert proc.stderr == b""  # nothing on a non-terminal stderr


def test_cli_terminal_output_goes_to_a_named_file(tmp_path, tiny, convos, cart_home):
    """Never binary onto a terminal: with stdout a tty and no -o, a default file is announced."""
    import pty

    model_dir = tiny[0]
    pid, fd = pty.fork()
    if pid == 0:  # child: stdout and stderr are the terminal
        os.chdir(tmp_path)
        os.execve(str(CART), [str(CART), "distill", str(convos), "-m", str(model_dir), "-p", "6",
                              "--steps", "1"], env_for(cart_home))
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    files = list(tmp_path.glob("cartridge-*-p6.safetensors"))
    assert len(files) == 1 and files[0].name == "cartridge-feedface-p6.safetensors"
    assert f"the cartridge goes to {files[0].name}".encode() in output
    assert b"\x00" not in output


def test_cli_resume_after_kill_is_exact(tmp_path, tiny, convos, cart_home, run_cart):
    """(Only the killed run needs a process of its own.)"""
    model_dir = tiny[0]
    args = [str(CART), "distill", str(convos), "-m", str(model_dir), "-p", "6", "--steps", "40",
            "--batch-size", "1", "--seq-len", "40", "--save-every", "1", "--dtype", "float32"]
    whole = tmp_path / "whole.safetensors"
    proc = run_cart(*args[1:], "-o", whole)
    assert proc.returncode == 0, proc.stderr.decode()
    resumed = tmp_path / "resumed.safetensors"
    ckpt = Path(str(resumed) + ".ckpt")
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([*args, "-o", str(resumed), "--log", str(log)], env=env_for(cart_home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not resumed.exists(), "the run finished before it could be killed"
    proc = run_cart(*args[1:], "-o", resumed, "--log", log)
    assert proc.returncode == 0, proc.stderr.decode()
    a, b = load(whole), load(resumed)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert torch.equal(x, y)
    steps = [orjson.loads(line)["step"] for line in log.read_bytes().splitlines()]
    assert steps == list(range(1, 41))  # steps logged once each, across the kill
    assert not ckpt.exists()


def test_cli_init_variants(tmp_path, tiny, convos, run_cart):
    model_dir = tiny[0]
    out = {}
    for init in ("random-tokens", "random-vectors"):
        out[init] = tmp_path / f"{init}.safetensors"
        proc = run_cart("distill", convos, "-m", model_dir, "-p", 6, "--steps", 1, "--init", init,
                        "-o", out[init])
        assert proc.returncode == 0, proc.stderr.decode()
        assert load(out[init]).metadata["init"]["kind"] == init
    text = tmp_path / "init.txt"
    text.write_text("Meridian Falls has four bridges and a tram line. " * 3)
    proc = run_cart("distill", convos, "-m", model_dir, "-p", 6, "--steps", 1, "--init", "text",
                    "--init-text", text, "-o", tmp_path / "text.safetensors")
    assert proc.returncode == 0, proc.stderr.decode()
    # continue training from an existing cartridge: p comes from the file
    cont = tmp_path / "continued.safetensors"
    proc = run_cart("distill", convos, "-m", model_dir, "--steps", 1, "--init", out["random-tokens"],
                    "-o", cont)
    assert proc.returncode == 0, proc.stderr.decode()
    c = load(cont)
    assert c.num_tokens == 6 and c.metadata["init"]["kind"] == "cartridge"
    assert torch.equal(c.frozen_keys[0], load(out["random-tokens"]).frozen_keys[0])


def test_a_flat_cartridge_trains_as_its_padded_rectangular_twin(tmp_path, tiny, convos, run_cart):
    """``--init`` a flat (ragged) cartridge: trained in place (the dense attention path), its
    kept keys and values move exactly as the same keys do in the rectangular cartridge that
    holds them among -inf-biased padding; sinks and biases stay as they were."""
    from reference import RAGGED, flattened, padded

    from cart.cartridge import Cartridge
    from cart.kvcache import cartridge_from_tokens
    from cart.models import load_model, resolve_model

    model_dir, tok, identity, head = tiny
    md = {"base_model": identity.model_id, "model_config_hash": identity.config_hash,
          "tokenizer_hash": identity.tokenizer_hash}
    base = cartridge_from_tokens(load_model(resolve_model(str(model_dir))), torch.tensor(head[:12]))
    gen = torch.Generator().manual_seed(0)
    biases = [torch.randn(base.kv_heads, 12, generator=gen) * 0.5 for _ in range(base.num_layers)]
    for b in biases:
        b[:, 0] = 0
    rect = Cartridge(base.frozen_keys, base.frozen_values, base.keys, base.values, md, biases)
    trained = {}
    for name, cart in (("flat", flattened(rect, RAGGED)), ("padded", padded(rect, RAGGED))):
        cart.save(tmp_path / f"{name}.safetensors")
        proc = run_cart("distill", convos, "-m", model_dir, "--steps", 2, "--init",
                        tmp_path / f"{name}.safetensors", "-o", tmp_path / f"{name}-out.safetensors")
        assert proc.returncode == 0, proc.stderr.decode()
        trained[name] = load(tmp_path / f"{name}-out.safetensors")
        start = load(tmp_path / f"{name}.safetensors")
        assert trained[name].format == start.format and all(
            torch.equal(a, b) for a, b in zip(trained[name].biases, start.biases))
        assert all(torch.equal(a, b) for a, b in zip(trained[name].frozen_keys, start.frozen_keys))
    flat, pad = trained["flat"], trained["padded"]
    assert flat.flat and not torch.equal(flat.keys[1], flattened(rect, RAGGED).keys[1])
    for layer, heads in enumerate(RAGGED):
        column = 0
        for h, kept in enumerate(heads):
            rows = [j - 1 for j in kept[1:]]  # trainable positions (the sink is frozen)
            for got, want in ((flat.keys, pad.keys), (flat.values, pad.values)):
                torch.testing.assert_close(got[layer][0, column:column + len(rows)],
                                           want[layer][h, rows], atol=1e-5, rtol=1e-4)
            column += len(rows)


def test_bfloat16_autocast_trains_a_float32_cartridge(tmp_path, tiny, convos, run_cart):
    out = tmp_path / "bf16.safetensors"
    proc = run_cart("distill", convos, "-m", tiny[0], "-p", 6, "--steps", 2, "--dtype", "bfloat16",
                    "-o", out)
    assert proc.returncode == 0, proc.stderr.decode()
    cart = load(out)
    assert cart.dtype == "float32" and cart.metadata["training"]["compute_dtype"] == "bfloat16"
    assert all(torch.isfinite(t).all() for t in cart.keys + cart.values)


def test_cli_info_shows_how_to_reproduce(tmp_path, tiny, convos, run_cart):
    model_dir = tiny[0]
    out = tmp_path / "c.safetensors"
    assert run_cart("distill", convos, "-m", model_dir, "-p", 6, "--steps", 1, "-o", out).returncode == 0
    proc = run_cart("info", out, "--json")
    info = orjson.loads(proc.stdout)
    md = info["metadata"] if "metadata" in info else info
    text = orjson.dumps(md).decode()
    for needle in ("\"init\"", "\"training\"", "\"synth\"", "\"lr\"", "\"seq_len\"", "data_sha256",
                   "corpus_hash", "\"steps\""):
        assert needle in text, needle


# -- bad inputs ----------------------------------------------------------------------------------
def test_convos_from_another_model_are_refused(tiny, other_tiny_model, convos, run_cart):
    proc = run_cart("distill", convos, "-m", other_tiny_model, "-p", 6, "--steps", 1)
    err = one_line_error(proc)
    assert f"{convos}: conversations from model" in err and "give --model" in err


def test_mixed_models_in_one_input_are_refused(tmp_path, tiny, other_tiny_model, run_cart):
    model_dir, tok, identity, head = tiny
    _, other_tok, other_identity = _identity(other_tiny_model)
    path = write_convos(tmp_path / "mixed.jsonl", [
        convo_record(tok, identity, FACT_Q, FACT_A, 0, head=head),
        convo_record(other_tok, other_identity, FACT_Q, FACT_A, 1)])
    err = one_line_error(run_cart("distill", path, "-m", model_dir, "-p", 6))
    assert err.startswith(f"cart: error: {path}:2: conversation from model") and "distill one model's data" in err


@pytest.mark.parametrize("content, message", [
    (b"", "no conversations"),
    (b"\n\n", "no conversations"),
    (b'{"schema": "cart.chunk/1", "id": "x", "text": "y"}\n', ":1: expected a cart.convo/1 record, got cart.chunk/1"),
    (b"{not json\n", ":1: invalid JSON"),
])
def test_bad_conversation_files(tmp_path, tiny, run_cart, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    err = one_line_error(run_cart("distill", path, "-m", tiny[0], "-p", 6))
    assert message in err


def test_bad_targets_are_named(tmp_path, tiny, run_cart):
    model_dir, tok, identity, head = tiny
    r = convo_record(tok, identity, FACT_Q, FACT_A, head=head)
    r["targets"]["positions"][2] = 10_000
    path = write_convos(tmp_path / "bad.jsonl", [r])
    err = one_line_error(run_cart("distill", path, "-m", model_dir, "-p", 6))
    assert err == f"cart: error: {path}:1: targets.positions[2] = 10000 is outside 1..{len(r['token_ids']) - 1}"


def test_p_larger_than_the_init_text(tmp_path, tiny, convos, run_cart):
    model_dir, tok, _, head = tiny
    err = one_line_error(run_cart("distill", convos, "-m", model_dir, "-p", 500))
    assert err == (f"cart: error: --init attention-match: the corpus has {len(head)} tokens, fewer "
                   "than -p/--tokens 500 (lower -p)")
    err = one_line_error(run_cart("distill", convos, "-m", model_dir, "-p", 500, "--init", "corpus"))
    assert err == (f"cart: error: --init corpus: the corpus provides {len(head)} tokens, fewer than "
                   "-p/--tokens 500 (lower -p, or --init random-tokens)")
    text = tmp_path / "short.txt"
    text.write_text("four bridges")
    n = len(tok("four bridges", add_special_tokens=False)["input_ids"])
    err = one_line_error(run_cart("distill", convos, "-m", model_dir, "-p", 50, "--init", "text",
                                  "--init-text", text))
    assert err == f"cart: error: {text}: --init-text provides {n} tokens, fewer than -p/--tokens 50"


def test_no_corpus_head_says_what_to_do(tmp_path, tiny, run_cart):
    model_dir, tok, identity, _ = tiny
    path = write_convos(tmp_path / "nohead.jsonl", [convo_record(tok, identity, FACT_Q, FACT_A)])
    err = one_line_error(run_cart("distill", path, "-m", model_dir, "-p", 6))
    assert err == ("cart: error: --init attention-match: the conversations carry no corpus (cart "
                   "synth stores it in conversation 0 when it reads the corpus or a chunk that "
                   "starts it); use --init random-tokens")
    err = one_line_error(run_cart("distill", path, "-m", model_dir, "-p", 6, "--init", "corpus"))
    assert "carry no corpus head" in err and "--init text --init-text CORPUS" in err


@pytest.mark.parametrize("args, message", [
    (["-p", "1"], "-p/--tokens must be at least 2, got 1"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "3e38"], "--lr must be at most 100.0, got 3e+38"),
    (["--objective", "mse"], "--objective must be one of kl, ntp, got 'mse'"),
    (["--init", "zeros"], "--init must be attention-match, corpus, random-tokens, random-vectors, "
                          "text, a .safetensors cartridge file or a PEFT cartridge adapter folder, "
                          "got 'zeros'"),
    (["--init", "text"], "--init text needs --init-text FILE"),
    (["--batch-size", "3", "--grad-accum", "2"], "--batch-size (3) must be a multiple of --grad-accum (2)"),
    (["--init", "missing.safetensors"], "missing.safetensors: no such cartridge file"),
])
def test_bad_settings(tiny, convos, run_cart, args, message):
    err = one_line_error(run_cart("distill", convos, "-m", tiny[0], *args))
    assert message in err


def test_existing_output_survives_a_failed_run(tmp_path, tiny, convos, run_cart):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    one_line_error(run_cart("distill", convos, "-m", tiny[0], "-p", 500, "-o", out))
    assert out.read_bytes() == b"precious"


def test_checkpoint_of_another_run_is_refused(tmp_path, tiny, convos, run_cart):
    model_dir = tiny[0]
    ckpt = tmp_path / "run.ckpt"
    proc = run_cart("distill", convos, "-m", model_dir, "-p", 6, "--steps", 3, "--save-every", 1,
                    "--checkpoint", ckpt, "-o", tmp_path / "a.safetensors")
    assert proc.returncode == 0
    # the run removes its checkpoint when done; make one and change a setting
    proc = subprocess.Popen([str(CART), "distill", str(convos), "-m", str(model_dir), "-p", "6",
                             "--steps", "10000", "--save-every", "1", "--checkpoint", str(ckpt),
                             "-o", str(tmp_path / "b.safetensors")],
                            env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    err = one_line_error(run_cart("distill", convos, "-m", model_dir, "-p", 6, "--lr", 0.1,
                                  "--checkpoint", ckpt, "-o", tmp_path / "b.safetensors"))
    assert err == (f"cart: error: {ckpt}: checkpoint of another run (different data, init or "
                   "settings); delete it to start over")


# -- distributed ---------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path, tiny, convos, cart_home, run_cart):
    """Same global batch (4 rows): 2 gloo processes x 1 micro-step == 1 process x 2 micro-steps."""
    model_dir = tiny[0]
    common = [str(convos), "-m", str(model_dir), "-p", "6", "--steps", "5", "--batch-size", "4",
              "--seq-len", "30", "--dtype", "float32", "--init", "corpus"]
    one = tmp_path / "one.safetensors"
    proc = run_cart("distill", *common, "--grad-accum", "2", "-o", one)
    assert proc.returncode == 0, proc.stderr.decode()
    two = tmp_path / "two.safetensors"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "cart",
                           "distill", *common, "-o", str(two)],
                          env={**env_for(cart_home), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    a, b = load(one), load(two)
    assert b.metadata["training"]["processes"] == 2
    worst = max(float((x - y).abs().max()) for x, y in zip(a.keys + a.values, b.keys + b.values))
    print(f"2 processes vs 1 (grad-accum 2), 5 Adam steps: max |difference| {worst:.2e}")
    assert worst < 1e-5, worst
    assert a.metadata["loss"] == pytest.approx(b.metadata["loss"], rel=1e-5)


# -- teacher targets that could make a NaN cartridge (issue 15, items 4 and 8) --------------------
def test_vanishing_teacher_candidates_train_a_finite_cartridge(tmp_path, tiny, run_cart):
    """All candidates of a position at log-prob -1000 (exp() underflows to 0): renormalised in
    log space, not 0/0, so training stays finite."""
    model_dir, tok, identity, head = tiny
    r = convo_record(tok, identity, FACT_Q, FACT_A, 0, head=head)
    r["targets"]["ids"][1] = [r["targets"]["ids"][1][0], 5]
    r["targets"]["logprobs"][1] = [-1000.0, -1000.0]
    path = write_convos(tmp_path / "c.jsonl", [r])
    out = tmp_path / "c.safetensors"
    proc = run_cart("distill", path, "-m", model_dir, "-p", 6, "-o", out)
    assert proc.returncode == 0, proc.stderr.decode()
    cart = load(out)  # (a flat cartridge's biases are -inf off each head's keys, by design)
    assert all(torch.isfinite(t).all() for t in cart.frozen_keys + cart.frozen_values + cart.keys + cart.values)
    assert cart.metadata["loss"] == cart.metadata["loss"]  # recorded, and not NaN


@pytest.mark.parametrize("field, value, message", [
    ("ids", ["5"], "targets.ids[1] must hold token ids (non-negative integers), got '5'"),
    ("ids", [-3], "targets.ids[1] must hold token ids (non-negative integers), got -3"),
    ("ids", [True], "targets.ids[1] must hold token ids (non-negative integers), got True"),
    ("ids", [1.0], "targets.ids[1] must hold token ids (non-negative integers), got 1.0"),
    ("ids", [None], "targets.ids[1] must hold token ids (non-negative integers), got None"),
    ("logprobs", [float("-inf")], "targets.logprobs[1] must hold finite log-probabilities (<= 0)"),
    ("logprobs", [float("nan")], "targets.logprobs[1] must hold finite log-probabilities (<= 0)"),
    ("logprobs", ["-1"], "targets.logprobs[1] must hold finite log-probabilities (<= 0)"),
    ("positions", True, "targets.positions[1] = True is outside 1..{last}"),
])
def test_bad_teacher_targets_are_refused_on_load(tiny, field, value, message):
    """(JSON files cannot hold NaN or infinities -- orjson refuses them -- but other writers'
    records reach the same check.)"""
    from cart.distill import _parse_convo
    from cart.io import CartError

    model_dir, tok, identity, head = tiny
    r = convo_record(tok, identity, FACT_Q, FACT_A, 0, head=head)
    r["targets"][field][1] = value
    with pytest.raises(CartError) as e:
        _parse_convo(r, "c.jsonl:1")
    assert str(e.value) == "c.jsonl:1: " + message.format(last=len(r["token_ids"]) - 1)


@pytest.mark.parametrize("where, message", [
    ("ids", "{path}:1: targets.ids[2] holds token id 1000000, outside the model's vocabulary ({vocab})"),
    ("ids-string", "{path}:1: targets.ids[2] must hold token ids (non-negative integers), got '7'"),
    ("token_ids", "{path}:1: token_ids holds token id 1000000, outside the model's vocabulary ({vocab})"),
])
def test_bad_candidate_ids_are_one_line_errors(tmp_path, tiny, run_cart, where, message):
    model_dir, tok, identity, head = tiny
    r = convo_record(tok, identity, FACT_Q, FACT_A, 0, head=head)
    if where == "ids":
        r["targets"]["ids"][2] = [1_000_000]
    elif where == "ids-string":
        r["targets"]["ids"][2] = ["7"]
    else:
        r["token_ids"][0] = 1_000_000
    path = write_convos(tmp_path / "c.jsonl", [r])
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    err = one_line_error(run_cart("distill", path, "-m", model_dir, "-p", 6, "-o", out))
    from cart.models import load_config, resolve_model

    vocab = load_config(resolve_model(str(model_dir))).vocab_size
    assert err == "cart: error: " + message.format(path=path, vocab=vocab)
    assert out.read_bytes() == b"precious"


def test_a_non_finite_loss_stops_with_the_step_and_the_record(tmp_path, tiny, convos, run_cart):
    """A cartridge whose values overflow the model (finite, but 3e38) makes the loss NaN: the
    run stops at that step, naming it and a record, and writes nothing."""
    from cart.kvcache import cartridge_from_tokens
    from cart.models import load_model, resolve_model

    model_dir, tok, identity, head = tiny
    model = load_model(resolve_model(str(model_dir)))
    md = {"base_model": identity.model_id, "model_config_hash": identity.config_hash,
          "tokenizer_hash": identity.tokenizer_hash}
    init = cartridge_from_tokens(model, torch.tensor(head[:6]), metadata=md)
    init.keys = [torch.full_like(k, 3e38) for k in init.keys]
    init.values = [torch.full_like(v, 3e38) for v in init.values]
    init.save(tmp_path / "huge.safetensors")
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    err = one_line_error(run_cart("distill", convos, "-m", model_dir, "--init",
                                  tmp_path / "huge.safetensors", "--steps", 2, "-o", out))
    assert err.startswith(f"cart: error: step 1: the loss is not finite on every conversation of "
                          f"the step (the first: {convos}:")
    assert err.endswith("the cartridge's values are out of range (training diverged? lower --lr); "
                        "no cartridge written")
    assert out.read_bytes() == b"precious" and not (tmp_path / "keep.safetensors.ckpt").exists()


def test_a_non_finite_loss_names_the_conversation_at_fault(tiny, convos):
    from cart.distill import non_finite_loss

    model, tok, data, module = trainable(tiny, convos, 6)
    real = module.forward

    def forward(batch, scale):  # conversation 3 alone gives NaN
        loss, l_sum, k_sum = real(batch, scale)
        if batch.input_ids.shape[1] == len(data.convos[3].token_ids) and torch.equal(
                batch.input_ids[0], torch.tensor(data.convos[3].token_ids)):
            return loss, float("nan"), k_sum
        return loss, l_sum, k_sum

    module.forward = forward
    err = non_finite_loss(7, [[1, 3], [4]], data.convos, module, 6, 0, "cpu")
    assert str(err) == (f"step 7: the loss is not finite on conversation {convos}:4 "
                        "(convo-test-000003); no cartridge written")


def test_the_run_fingerprint_ignores_the_inits_wall_time():
    """A resumed default run (attention-match init) recomputes the compaction, whose seconds
    differ: the checkpoint must still be its own; another init or setting is another run."""
    from cart.distill import DistillConfig, distill_fingerprint

    cfg = DistillConfig(tokens=8)
    init = {"kind": "attention-match", "windows": 1, "seconds": 0.0}
    same = distill_fingerprint(cfg, "d", init)
    assert distill_fingerprint(cfg, "d", {**init, "seconds": 41.7}) == same
    assert distill_fingerprint(DistillConfig(tokens=8, steps=99), "d", init) == same
    assert distill_fingerprint(cfg, "d", {**init, "windows": 2}) != same
    assert distill_fingerprint(DistillConfig(tokens=8, lr=0.02), "d", init) != same


def test_lr_default_depends_on_the_start():
    """A fitted start (the default compaction, a cartridge file) trains at the low rate, a cold
    one at the high rate; a rate given is kept."""
    from cart.distill import COLD_START_LR, FITTED_START_LR, DistillConfig

    assert DistillConfig(tokens=8).lr == FITTED_START_LR < COLD_START_LR
    assert DistillConfig(tokens=8, init="old.safetensors").lr == FITTED_START_LR
    for cold in ("corpus", "random-tokens", "random-vectors"):
        assert DistillConfig(tokens=8, init=cold).lr == COLD_START_LR
    assert DistillConfig(tokens=8, init="corpus", lr=0.3).lr == 0.3
