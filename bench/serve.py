"""Benchmark: cart serve answering N concurrent users from (a) their corpus in context and
(b) a p-token cartridge of it -- the paper's serving claim (section 3.3, appendix A.6: 26.4x
higher throughput on average on an H100), measured side by side in one run on this machine.

Each of N users has a different corpus of a few thousand tokens (windows of the shipped example
corpora) and asks one question at the same moment as the others, streaming the answer:
  (a) ICL: the corpus in the system message (the template cart synth and cart eval use),
      model = the base model;
  (b) cartridge: model = the user's own p-token cartridge, the question alone.
Both arms go through a real `cart serve` process (one fresh process per arm, same settings) and
the openai client, decode greedily and generate exactly --max-tokens tokens each (ignore_eos),
so tokens/s compares like with like. The cartridges are initialised from each corpus's first
p tokens and not trained: serving speed depends on p, not on the values in the cache.

Reported per arm: aggregate tokens/s (all generated tokens / wall time from the first request to
the last token), time to first token (mean and max over users), and KV memory (the server's
measured peak of KV held by the running batch, and the model of it below). Run alone:
competing CPU load skews timings on a 2-core machine.

--memory-limited (the paper's appendix A.6): for the given corpus size, each method runs the
largest batch of users whose KV fits a memory budget (--memory-gib; default: on CUDA 90% of
the device's free memory minus the weights, on a CPU 0.5 GiB so that it runs in a minute or
two), capped by --max-users (default 16 on a CPU, 1024 on a GPU). KV a batch of B users needs,
as cart serve's transformers engine holds it (``TransformersBatch.kv_bytes``, which /health
reports): B rows padded to the longest prompt with room for --max-tokens (ICL: template +
corpus + question; cartridge: question) -- counted --row-copies times (default 2: the engine
prefills newcomers into caches of their own and then copies them into the batch's buffers, so
while a batch forms both exist) -- plus, with cartridges, each distinct cartridge once (p
tokens) and once more when a batch mixes several (the padded stack of ``cart.attention``).
Every user has a cartridge of their own unless --cartridges K (users share K round-robin).

--baselines (issue 16's GPU checks) adds, in this process before the servers start:
  * plain ``model.generate`` of transformers (its SDPA attention, one left-padded batch,
    greedy, exactly --max-tokens each, prefill included) on the ICL prompts and on prompts the
    size of a cartridge plus the question (the corpus's first p tokens in context): the
    tokens/s any engine on this model and shapes should reach;
  * the ICL decode step of cart's engine at the arm's batch (median over --decode-steps steps,
    after the prompts are in) against the memory-bandwidth bound: weights plus the batch's KV
    read once per step at the device's peak bandwidth (spec sheet of a known GPU,
    --peak-gb-s, or a large copy measured in this run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = [ROOT / "examples" / "orbital" / "corpus.md", ROOT / "examples" / "meridian" / "corpus.md"]
QUESTION = "Summarise the most important facts in the document in a few sentences."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(carts: Path, model: str | None, max_batch: int, engine: str = "transformers",
                 device: str = "auto", dtype: str = "auto",
                 cache_bytes: int | None = None) -> tuple[subprocess.Popen, str]:
    """A `cart serve` process decoding up to ``max_batch`` requests together (and admitting
    that many plus a warm-up one); ``cache_bytes``: its --cache-bytes for loaded cartridges."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "cart", "serve", "--cartridges", str(carts), "--port", str(port),
           "--max-batch", str(max_batch), "--max-concurrent", str(max(64, max_batch + 1)),
           "--engine", engine, "--device", device, "--dtype", dtype, "-q"]
    if cache_bytes:
        cmd += ["--cache-bytes", str(cache_bytes)]
    if model:
        cmd += ["-m", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"cart serve exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise SystemExit("cart serve did not come up")
        time.sleep(0.3)


async def one_user(client, model: str, messages: list[dict], max_tokens: int, t0: float):
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first, tokens = None, 0
    async for chunk in stream:
        if first is None and any(c.delta.content or c.finish_reason for c in chunk.choices):
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first, tokens, time.perf_counter() - t0


def run_arm(url: str, jobs: list[tuple[str, list[dict]]], max_tokens: int) -> dict:
    import httpx
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    async def go():
        # every user on a connection of their own (the client's default pool holds 1000)
        limits = httpx.Limits(max_connections=len(jobs) + 8, max_keepalive_connections=len(jobs) + 8)
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600,
                             http_client=DefaultAsyncHttpxClient(limits=limits))
        # warm-up, untimed: listing the models reads every cartridge file into the server's
        # cache (as a server that has been running would hold them); one short request on the
        # first job's model (allocations, first-call costs)
        await client.models.list()
        await client.chat.completions.create(model=jobs[0][0], messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2, temperature=0)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_user(client, m, msgs, max_tokens, t0) for m, msgs in jobs))
        return results, time.perf_counter() - t0

    results, wall = asyncio.run(go())
    health = httpx.get(url + "/health").json()
    ttft = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_mean_s": sum(ttft) / len(ttft), "ttft_max_s": max(ttft),
            "kv_bytes_peak": health["kv_bytes_peak"], "batch_peak": health["batch_peak"]}


def workload(engine, users: int, corpus_tokens: int, p: int, max_tokens: int, carts: Path,
             cartridges: int | None = None):
    """Each user's corpus (a window of the example corpora), with a p-token cartridge of it
    saved in ``carts`` as userN -- one per user, or with ``cartridges`` K the first K users'
    and user i asks cartridge user{i % K}. Returns (ICL jobs, cartridge jobs, ICL prompt
    lengths, cartridge prompt lengths): a job is (model, messages); the lengths are in tokens,
    the prompt after a cartridge without it."""
    import torch

    from cart.chat import SYSTEM_TEMPLATE, render_cartridge_ids, render_ids
    from cart.kvcache import cartridge_from_tokens

    tok, ident = engine.tokenizer, engine.identity
    text_ids = []
    for path in CORPORA:
        text_ids += tok(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    if len(text_ids) < corpus_tokens:
        raise SystemExit(f"the example corpora hold {len(text_ids)} tokens; --corpus-tokens "
                         f"{corpus_tokens} is more")
    stride = max(1, (len(text_ids) - corpus_tokens) // max(1, users - 1))
    corpora = [text_ids[min(i * stride, len(text_ids) - corpus_tokens):][:corpus_tokens]
               for i in range(users)]
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash}
    question = [{"role": "user", "content": QUESTION}]
    distinct = min(cartridges or users, users)
    question_len = len(render_cartridge_ids(tok, question, True)[0])
    icl_jobs, cart_jobs, icl_lens, cart_lens = [], [], [], []
    for i, ids in enumerate(corpora):
        if i < distinct:
            with torch.inference_mode():
                cart = cartridge_from_tokens(engine.model, torch.tensor(ids[:p], device=engine.model.device),
                                             metadata=md)
            cart.save(carts / f"user{i}.safetensors")
        icl_msgs = [{"role": "system", "content": SYSTEM_TEMPLATE.format(chunk=tok.decode(ids))}] + question
        icl_jobs.append((ident.model_id, icl_msgs))
        cart_jobs.append((f"user{i % distinct}", question))
        icl_lens.append(len(render_ids(tok, icl_msgs, True)[0]))
        cart_lens.append(question_len)
    return icl_jobs, cart_jobs, icl_lens, cart_lens


def kv_bytes_model(prompt_lens: list[int], max_tokens: int, per_token: int, p: int = 0,
                   cartridges: int = 0, row_copies: int = 1) -> int:
    """KV bytes cart serve's transformers engine holds for these users decoded together
    (``TransformersBatch.kv_bytes``): the rows padded to the longest prompt with room for
    ``max_tokens`` (times ``row_copies``, see the module docstring), each of ``cartridges``
    distinct p-token cartridges once, and once more stacked when there are several."""
    if not prompt_lens:
        return 0
    rows = len(prompt_lens) * (max(prompt_lens) + max_tokens) * row_copies
    return (rows + cartridges * p * (2 if cartridges > 1 else 1)) * per_token


def fits(budget: int, prompt_lens: list[int], max_tokens: int, per_token: int, p: int = 0,
         cartridges: int | None = None, row_copies: int = 1) -> int:
    """The largest batch of the first users of ``prompt_lens`` whose KV (``kv_bytes_model``)
    fits ``budget`` bytes; ``cartridges``: distinct cartridges they share round-robin (None:
    one each; 0: ICL, none)."""
    def need(b):
        k = 0 if cartridges == 0 else min(b, cartridges or b)
        return kv_bytes_model(prompt_lens[:b], max_tokens, per_token, p, k, row_copies)

    lo, hi = 0, len(prompt_lens)  # need() grows with b: the largest b with need(b) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid - 1)
    return lo


# spec-sheet HBM bandwidth, GB/s (first match in the device name wins: "h100 pcie" before "h100")
PEAK_GB_S = [("h200", 4800.0), ("h100 pcie", 2000.0), ("h100 nvl", 3900.0), ("h100", 3350.0),
             ("a100", 2039.0)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def peak_bandwidth(device: str, given: float | None) -> tuple[float, str]:
    """(GB/s, source): --peak-gb-s, a known GPU's spec sheet, or the best of five copies of a
    512 MiB tensor in this run (bytes read + written / time)."""
    import torch

    if given:
        return given, "--peak-gb-s"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for key, gb_s in PEAK_GB_S:
            if key in name.lower():
                return gb_s, f"spec sheet of {name}"
    src = torch.empty(128 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9, "measured: a 512 MiB copy in this run"


def generate_baseline(engine, prompts: list[list[int]], max_tokens: int, device: str) -> dict:
    """Plain ``model.generate`` (transformers' SDPA attention) of ``prompts`` in one
    left-padded batch, greedy, exactly ``max_tokens`` each: tokens/s, prefill included."""
    import torch

    from cart.attention import register

    model, pad = engine.model, engine.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=model.device)
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            kw = dict(do_sample=False, pad_token_id=pad)
            model.generate(input_ids=ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, **kw)
            sync(device)
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, **kw)
            sync(device)
            wall = time.perf_counter() - t
    finally:
        model.set_attn_implementation(register())
    tokens = (out.shape[1] - width) * len(prompts)
    return {"users": len(prompts), "prompt_tokens_max": width, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall}


def decode_step(engine, prompts: list[list[int]], steps: int, device: str, weights: int,
                bandwidth: float) -> dict:
    """cart's engine decoding ``prompts`` together (the ICL arm's batch, no server): the median
    time of one decode step once every prompt is in, against the bandwidth bound (weights + the
    batch's KV read once, at ``bandwidth`` GB/s)."""
    from cart.engines.base import GenerationRequest

    batch = engine.open_batch()
    batch.add([GenerationRequest(x, steps + 2, 0.0, ignore_eos=True) for x in prompts], [0] * len(prompts))
    batch.step()  # warm-up
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        batch.step()
        sync(device)
        times.append(time.perf_counter() - t)
    kv = batch.kv_bytes()
    batch.drop(list(batch.rows))
    step_s = sorted(times)[len(times) // 2]
    bound_s = (weights + kv) / (bandwidth * 1e9)
    return {"users": len(prompts), "step_ms": step_s * 1e3, "kv_bytes": kv, "weights_bytes": weights,
            "bound_ms": bound_s * 1e3, "x_bound": step_s / bound_s}


def run_baselines(engine, icl_jobs: list, p: int, max_tokens: int, device: str, weights: int,
                  args) -> dict:
    """--baselines: plain ``model.generate`` on the ICL prompts and on cartridge-sized ones
    (their first p tokens + the question), and cart's ICL decode step against its bound."""
    from cart.chat import render_cartridge_ids, render_ids

    tok = engine.tokenizer
    icl = [render_ids(tok, msgs, True)[0] for _, msgs in icl_jobs]
    question = render_cartridge_ids(tok, [{"role": "user", "content": QUESTION}], True)[0]
    bandwidth, source = peak_bandwidth(device, args.peak_gb_s)
    step = decode_step(engine, icl, args.decode_steps, device, weights, bandwidth)
    return {"generate_icl": generate_baseline(engine, icl, max_tokens, device),
            "generate_cartridge_sized": generate_baseline(engine, [x[:p] + question for x in icl],
                                                          max_tokens, device),
            "icl_decode_step": {**step, "bandwidth_gb_s": bandwidth, "bandwidth_source": source}}


def print_baselines(base: dict, cartridge_tokens_per_s: float) -> None:
    g_icl, g_short, step = base["generate_icl"], base["generate_cartridge_sized"], base["icl_decode_step"]
    gib = float(1 << 30)
    print(f"plain model.generate (transformers SDPA, one left-padded batch of {g_icl['users']}, "
          f"greedy, prefill included): ICL prompts (<= {g_icl['prompt_tokens_max']} tokens) "
          f"{g_icl['tokens_per_s']:.1f} tok/s; cartridge-sized prompts (<= "
          f"{g_short['prompt_tokens_max']} tokens) {g_short['tokens_per_s']:.1f} tok/s; cart's "
          f"cartridge arm: {cartridge_tokens_per_s / g_short['tokens_per_s']:.2f}x the latter")
    print(f"ICL decode step of cart's engine, batch {step['users']}: {step['step_ms']:.2f} ms "
          f"(median); bandwidth bound {step['bound_ms']:.2f} ms = weights "
          f"{step['weights_bytes'] / gib:.2f} GiB + KV {step['kv_bytes'] / gib:.2f} GiB at "
          f"{step['bandwidth_gb_s']:.0f} GB/s ({step['bandwidth_source']}): "
          f"{step['x_bound']:.1f}x the bound")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4, help="concurrent users (default 4; "
                    "--memory-limited picks them)")
    ap.add_argument("--corpus-tokens", type=int, default=2048, help="tokens per user's corpus")
    ap.add_argument("-p", type=int, default=128, help="cartridge tokens (default 128)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per user")
    ap.add_argument("--model", default=None, help="model: a local folder, a .gguf (default: the "
                    "embedded SmolLM2)")
    ap.add_argument("--device", default="auto", help="cpu, cuda ... or auto (cart serve's --device)")
    ap.add_argument("--dtype", default="auto", help="cart serve's --dtype (default auto: bfloat16 "
                    "on a GPU, float32 on a CPU)")
    ap.add_argument("--cartridges", type=int, default=None, help="distinct cartridges, shared by "
                    "the users round-robin (default: one per user)")
    ap.add_argument("--memory-limited", action="store_true", help="each method runs the largest "
                    "batch of users whose KV fits --memory-gib (the paper's appendix A.6)")
    ap.add_argument("--memory-gib", type=float, default=None, help="KV budget with "
                    "--memory-limited (default: on CUDA 90%% of the free memory minus the "
                    "weights; on a CPU 0.5)")
    ap.add_argument("--max-users", type=int, default=None, help="cap on a --memory-limited "
                    "batch (default 16 on a CPU, 1024 on a GPU)")
    ap.add_argument("--row-copies", type=int, default=2, help="copies of a row's KV counted by "
                    "--memory-limited (default 2: see the module docstring)")
    ap.add_argument("--baselines", action="store_true", help="also plain model.generate on "
                    "the same prompts and cart's ICL decode step against the bandwidth bound")
    ap.add_argument("--decode-steps", type=int, default=16, help="decode steps timed by --baselines")
    ap.add_argument("--peak-gb-s", type=float, default=None, help="the device's memory bandwidth "
                    "for --baselines (default: a known GPU's spec sheet, else measured)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.baselines and args.memory_limited:
        raise SystemExit("--baselines measures the fixed --users batch: not with --memory-limited")

    import gc

    import torch

    from cart.cartridge import kv_bytes_per_token
    from cart.chat import render_cartridge_ids
    from cart.engines import resolve_runtime
    from cart.engines.hf import TransformersEngine
    from cart.models import resolve_device

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    dtype = resolve_runtime("transformers", args.dtype, device)[1]
    free = torch.cuda.mem_get_info(torch.device(device))[0] if cuda else None
    engine = TransformersEngine.load(args.model, dtype=dtype, device=device)
    ident = engine.identity
    weights = sum(t.numel() * t.element_size() for t in engine.model.parameters())
    weights += sum(t.numel() * t.element_size() for t in engine.model.buffers())
    span, p, gen = args.corpus_tokens, args.p, args.max_tokens
    per_token = kv_bytes_per_token(ident.num_layers, ident.kv_heads, ident.head_dim, dtype)
    gib, mib = float(1 << 30), float(1 << 20)
    memory = None
    if args.memory_limited:
        if args.memory_gib is not None:
            budget, source = int(args.memory_gib * gib), "--memory-gib"
        elif cuda:
            budget = int(0.9 * (free - weights))
            source = (f"90% of ({free / gib:.1f} GiB free on {device} - {weights / gib:.1f} GiB "
                      f"of weights)")
        else:
            budget, source = int(0.5 * gib), "the CPU default"
        cap = args.max_users or (1024 if cuda else 16)
        question = [{"role": "user", "content": QUESTION}]
        q_len = len(render_cartridge_ids(engine.tokenizer, question, True)[0])
        cart_users = fits(budget, [q_len] * cap, gen, per_token, p, args.cartridges, args.row_copies)
        users = cap
        distinct = min(args.cartridges or cart_users, cart_users) or 1
        try:  # every user holds a connection to the server
            import resource

            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ImportError, ValueError, OSError):
            pass
    else:
        users = args.users
        distinct = min(args.cartridges or users, users)
    with tempfile.TemporaryDirectory() as tmp:
        carts = Path(tmp)
        icl_jobs, cart_jobs, icl_lens, cart_lens = workload(engine, users, span, p, gen, carts, distinct)
        baselines = run_baselines(engine, icl_jobs, p, gen, device, weights, args) if args.baselines else None
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if args.memory_limited:
            icl_users = fits(budget, icl_lens, gen, per_token, 0, 0, args.row_copies)
            if icl_users == 0 or cart_users == 0:
                raise SystemExit(f"a single user does not fit {budget / gib:.2f} GiB ({source}): "
                                 f"ICL {icl_users}, cartridge {cart_users} users")
            icl_jobs, icl_lens = icl_jobs[:icl_users], icl_lens[:icl_users]
            cart_jobs, cart_lens = cart_jobs[:cart_users], cart_lens[:cart_users]
            memory = {"budget_bytes": budget, "budget_source": source, "max_users": cap,
                      "row_copies": args.row_copies, "kv_bytes_per_token": per_token,
                      "weights_bytes": weights, "icl_users": icl_users, "cartridge_users": cart_users,
                      "distinct_cartridges": distinct,
                      "icl_kv_bytes_per_user": (max(icl_lens) + gen) * per_token,
                      "cartridge_kv_bytes_per_user": (max(cart_lens) + gen) * per_token,
                      "cartridge_kv_bytes": p * per_token}
        # the server's cartridge cache: room for every distinct cartridge (float32 at most)
        cache_bytes = max(4 << 30, 2 * distinct * p * kv_bytes_per_token(
            ident.num_layers, ident.kv_heads, ident.head_dim, "float32"))
        arms = {}
        for name, jobs in (("ICL (corpus in context)", icl_jobs), (f"cartridge p={p}", cart_jobs)):
            proc, url = start_server(carts, args.model, len(jobs), device=device, dtype=dtype,
                                     cache_bytes=cache_bytes)
            try:
                arms[name] = run_arm(url, jobs, gen)
            finally:
                proc.terminate()
                proc.wait(120)
            arms[name]["users"] = len(jobs)
        arms["ICL (corpus in context)"]["kv_bytes_model"] = kv_bytes_model(icl_lens, gen, per_token)
        arms[f"cartridge p={p}"]["kv_bytes_model"] = kv_bytes_model(
            cart_lens, gen, per_token, p, min(distinct, len(cart_jobs)))

    (a_name, a), (b_name, b) = arms.items()
    threads = torch.get_num_threads()
    hw = (torch.cuda.get_device_name(torch.device(device)) if cuda else
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    shared = (f"{distinct} distinct cartridges shared round-robin" if args.cartridges
              else "each user their own")
    if memory:
        who = (f"the largest batch of users whose KV fits {budget / gib:.2f} GiB ({source}; rows "
               f"counted x{args.row_copies}), capped at {cap}: ICL {a['users']}, cartridge "
               f"{b['users']} users")
    else:
        who = f"{users} concurrent users"
    print(f"conditions: {who}, each a different {span}-token corpus (windows of examples/orbital "
          f"+ meridian); {gen} tokens generated per user (greedy, ignore_eos, streamed); "
          f"cartridge p={p}, {shared} (initialised from the corpus's first tokens: speed does "
          f"not depend on the values); one `cart serve` process per arm, transformers engine, "
          f"{dtype} on {device}, continuous batching (max batch = the arm's users); "
          f"{ident.model_id} ({ident.num_layers} layers, {ident.kv_heads} KV heads x "
          f"{ident.head_dim}, {per_token} B of KV per token); {hw}, torch {torch.__version__} "
          f"with {threads} threads; run alone on the machine")
    if memory:
        print(f"KV per user: ICL {memory['icl_kv_bytes_per_user'] / mib:.1f} MiB, cartridge "
              f"{memory['cartridge_kv_bytes_per_user'] / mib:.2f} MiB + the cartridge "
              f"{memory['cartridge_kv_bytes'] / mib:.2f} MiB (x2 when a batch mixes several) "
              f"per distinct cartridge")
    print(f"{'':26}{'users':>6}{'tokens/s':>10}{'TTFT mean':>11}{'TTFT max':>10}{'wall s':>8}"
          f"{'KV peak':>11}{'KV model':>11}")
    for name, r in arms.items():
        print(f"{name:26}{r['users']:>6}{r['tokens_per_s']:>10.1f}{r['ttft_mean_s']:>10.2f}s"
              f"{r['ttft_max_s']:>9.2f}s{r['wall_s']:>8.1f}{r['kv_bytes_peak'] / mib:>8.1f}MiB"
              f"{r['kv_bytes_model'] / mib:>8.1f}MiB")
    ratio = b["tokens_per_s"] / a["tokens_per_s"]
    if baselines:
        print_baselines(baselines, b["tokens_per_s"])
    if memory:
        print(f"ratio cartridge / ICL at the largest batches that fit: throughput {ratio:.1f}x, "
              f"batch {b['users'] / a['users']:.1f}x  [paper, appendix A.6, H100: 26.4x "
              f"throughput on average]")
    else:
        print(f"ratio cartridge / ICL: throughput {ratio:.1f}x, time to first token "
              f"{a['ttft_mean_s'] / b['ttft_mean_s']:.1f}x shorter, KV memory "
              f"{a['kv_bytes_peak'] / b['kv_bytes_peak']:.1f}x smaller (measured peak), "
              f"{a['kv_bytes_model'] / b['kv_bytes_model']:.1f}x (modelled, {per_token} B/token)  "
              f"[paper, H100, batches filling GPU memory: 26.4x throughput on average]")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "conditions": {**vars(args), "device": device, "dtype": dtype, "model_id": ident.model_id,
                           "hardware": hw, "torch": torch.__version__, "threads": threads},
            "memory": memory, "arms": arms, "throughput_ratio": ratio, "baselines": baselines},
            indent=2))


if __name__ == "__main__":
    main()
