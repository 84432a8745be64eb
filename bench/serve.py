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
measured peak of KV held by the running batch, and tokens x bytes per token). Run alone:
competing CPU load skews timings on a 2-core machine.
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
                 device: str = "auto", dtype: str = "auto") -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "cart", "serve", "--cartridges", str(carts), "--port", str(port),
           "--max-batch", str(max_batch), "--engine", engine, "--device", device, "--dtype", dtype,
           "-q"]
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
    from openai import AsyncOpenAI

    async def go():
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        # warm-up: one short request on the first job's model (allocations, first-call costs)
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


def workload(engine, users: int, corpus_tokens: int, p: int, max_tokens: int, carts: Path):
    """Each user's corpus (a window of the example corpora), with that user's p-token cartridge
    saved in ``carts`` as userN. Returns (ICL jobs, cartridge jobs, ICL KV tokens, cartridge KV
    tokens): a job is (model, messages)."""
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
    icl_jobs, cart_jobs, icl_tokens, cart_tokens = [], [], 0, 0
    for i, ids in enumerate(corpora):
        with torch.inference_mode():
            cart = cartridge_from_tokens(engine.model, torch.tensor(ids[:p], device=engine.model.device),
                                         metadata=md)
        cart.save(carts / f"user{i}.safetensors")
        icl_msgs = [{"role": "system", "content": SYSTEM_TEMPLATE.format(chunk=tok.decode(ids))}] + question
        icl_jobs.append((ident.model_id, icl_msgs))
        cart_jobs.append((f"user{i}", question))
        icl_tokens += len(render_ids(tok, icl_msgs, True)[0]) + max_tokens
        cart_tokens += p + len(render_cartridge_ids(tok, question, True)[0]) + max_tokens
    return icl_jobs, cart_jobs, icl_tokens, cart_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4, help="concurrent users (default 4)")
    ap.add_argument("--corpus-tokens", type=int, default=2048, help="tokens per user's corpus")
    ap.add_argument("-p", type=int, default=128, help="cartridge tokens (default 128)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per user")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="auto", help="cpu, cuda ... or auto (cart serve's --device)")
    ap.add_argument("--dtype", default="auto", help="cart serve's --dtype (default auto: bfloat16 "
                    "on a GPU, float32 on a CPU)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from cart.cartridge import kv_bytes_per_token
    from cart.engines import resolve_runtime
    from cart.engines.hf import TransformersEngine
    from cart.models import resolve_device

    device = resolve_device(args.device)
    dtype = resolve_runtime("transformers", args.dtype, device)[1]
    engine = TransformersEngine.load(args.model, dtype=dtype, device=device)
    ident = engine.identity
    span = args.corpus_tokens
    per_token = kv_bytes_per_token(ident.num_layers, ident.kv_heads, ident.head_dim, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        carts = Path(tmp)
        icl_jobs, cart_jobs, icl_tokens, cart_tokens = workload(
            engine, args.users, span, args.p, args.max_tokens, carts)
        del engine
        arms = {}
        for name, jobs in (("ICL (corpus in context)", icl_jobs), (f"cartridge p={args.p}", cart_jobs)):
            proc, url = start_server(carts, args.model, max(args.users, 1), device=device, dtype=dtype)
            try:
                arms[name] = run_arm(url, jobs, args.max_tokens)
            finally:
                proc.terminate()
                proc.wait(120)
        arms["ICL (corpus in context)"]["kv_bytes_model"] = icl_tokens * per_token
        arms[f"cartridge p={args.p}"]["kv_bytes_model"] = cart_tokens * per_token

    (a_name, a), (b_name, b) = arms.items()
    threads = torch.get_num_threads()
    print(f"conditions: {args.users} concurrent users, each a different {span}-token corpus "
          f"(windows of examples/orbital + meridian); {args.max_tokens} tokens generated per user "
          f"(greedy, ignore_eos, streamed); cartridge p={args.p} (initialised from the corpus's "
          f"first tokens: speed does not depend on the values); one `cart serve` process per "
          f"arm, transformers engine, {dtype} on {device}, continuous batching (max batch {args.users}); "
          f"{ident.model_id}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {threads} threads; run alone on the machine")
    mib = 1024 * 1024
    print(f"{'':26}{'tokens/s':>10}{'TTFT mean':>11}{'TTFT max':>10}{'wall s':>8}"
          f"{'KV peak':>11}{'KV model':>11}")
    for name, r in arms.items():
        print(f"{name:26}{r['tokens_per_s']:>10.1f}{r['ttft_mean_s']:>10.2f}s{r['ttft_max_s']:>9.2f}s"
              f"{r['wall_s']:>8.1f}{r['kv_bytes_peak'] / mib:>8.1f}MiB{r['kv_bytes_model'] / mib:>8.1f}MiB")
    ratio = b["tokens_per_s"] / a["tokens_per_s"]
    print(f"ratio cartridge / ICL: throughput {ratio:.1f}x, time to first token "
          f"{a['ttft_mean_s'] / b['ttft_mean_s']:.1f}x shorter, KV memory "
          f"{a['kv_bytes_peak'] / b['kv_bytes_peak']:.1f}x smaller (measured peak), "
          f"{a['kv_bytes_model'] / b['kv_bytes_model']:.1f}x (tokens x {per_token} B/token)  "
          f"[paper, H100, batches filling GPU memory: 26.4x throughput on average]")
    if args.json:
        Path(args.json).write_text(json.dumps({"conditions": vars(args), "arms": arms,
                                               "throughput_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
