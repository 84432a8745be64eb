"""Benchmark: the vLLM engine against the transformers engine, same run, same machine.

(1) synth: the same self-study conversations (example corpus, mixed seed prompts, greedy A and
    B so both engines generate comparable tokens, top-20 teacher log-probs) through
    ``synthesize_batch`` on each engine: generated tokens/s, conversations/min, and how many
    conversations came out token-identical.
(2) serve: N concurrent users streaming answers from a real ``cart serve`` process per engine
    and arm (bench/serve.py's setup): each user's corpus in context (ICL), and each user's own
    p-token cartridge. Aggregate tokens/s, time to first token.
Startup is not timed (vLLM's is ~40 s on a 2-core CPU). Run alone: competing CPU load skews
timings. On a GPU host the same script compares the engines there (the device is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "orbital" / "corpus.md"


def serve_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs (no GPU)"


def bench_synth(args) -> dict:
    import dataclasses

    from cart.engines import get_engine
    from cart.io import Console
    from cart.models import resolve_device
    from cart.seeds import get_seed_prompts
    from cart.synth import SynthConfig, batches_of, load_chunks, plan, synthesize_batch

    cfg = SynthConfig(num_convos=args.n, batch_size=args.batch_size, temperature_a=0.0,
                      temperature_b=0.0, max_tokens_a=args.max_tokens_a,
                      max_tokens_b=args.max_tokens_b, min_tokens=256, max_tokens=1024)
    console = Console(quiet=True)
    out = {}
    for name in ("transformers", "vllm"):
        engine = get_engine(name, args.model, device=resolve_device(args.device), top_k=cfg.top_k)
        chunks, _ = load_chunks([str(EXAMPLE)], cfg, None, console)
        batches = batches_of(plan(chunks, cfg, get_seed_prompts("mixed")), cfg.batch_size, (0, 1))
        meta = {"model": {}, "corpus": None, "config": {}}
        warm = dataclasses.replace(cfg, max_tokens_a=8, max_tokens_b=8)
        synthesize_batch(engine, batches[0], warm, 0, "warm", meta)  # first-call costs, untimed
        t0 = time.perf_counter()
        recs = [r for i, b in enumerate(batches) for r in synthesize_batch(engine, b, cfg, i, "bench", meta)]
        seconds = time.perf_counter() - t0
        tokens = sum(sum(r["stats"]["a_tokens"]) + sum(r["stats"]["b_tokens"]) for r in recs)
        out[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "convos_per_min": len(recs) / seconds * 60, "token_ids": [r["token_ids"] for r in recs]}
        if hasattr(engine, "close"):
            engine.close()
        del engine
    same = sum(a == b for a, b in zip(out["transformers"].pop("token_ids"), out["vllm"].pop("token_ids")))
    out["identical_conversations"] = same
    out["conversations"] = args.n
    return out


def bench_serve(args) -> dict:
    import tempfile

    from cart.chat import render_ids
    from cart.engines.hf import TransformersEngine

    sb = serve_bench()
    engine = TransformersEngine.load(args.model)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        carts = Path(tmp)
        icl_jobs, cart_jobs, _, _ = sb.workload(engine, args.users, args.corpus_tokens, args.p,
                                                args.max_tokens, carts)
        prompt_tokens = len(render_ids(engine.tokenizer, icl_jobs[0][1], True)[0])
        del engine
        for name in ("transformers", "vllm"):
            for arm, jobs in (("icl", icl_jobs), ("cartridge", cart_jobs)):
                proc, url = sb.start_server(carts, args.model, args.users, engine=name)
                try:
                    r = sb.run_arm(url, jobs, args.max_tokens)
                finally:
                    proc.terminate()
                    proc.wait(120)
                out[f"{name}/{arm}"] = {k: r[k] for k in ("tokens", "wall_s", "tokens_per_s",
                                                          "ttft_mean_s", "ttft_max_s")}
    out["icl_prompt_tokens"] = prompt_tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=16, help="synth conversations (default 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens-a", type=int, default=48)
    ap.add_argument("--max-tokens-b", type=int, default=96)
    ap.add_argument("--users", type=int, default=8, help="concurrent serve users (default 8)")
    ap.add_argument("--corpus-tokens", type=int, default=2048)
    ap.add_argument("-p", type=int, default=128, help="cartridge tokens (default 128)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per serve answer")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", choices=("synth", "serve"), default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch
    import vllm

    figures = {"device": device_name(), "torch": torch.__version__, "vllm": vllm.__version__}
    print(f"device: {figures['device']}; torch {torch.__version__}, vllm {vllm.__version__}; "
          f"float32; run alone on the machine")
    if args.only != "serve":
        s = bench_synth(args)
        figures["synth"] = s
        print(f"== synth: {args.n} conversations, 1 turn, A <= {args.max_tokens_a} and B <= "
              f"{args.max_tokens_b} tokens, greedy, top-20 teacher log-probs, batch {args.batch_size}")
        print(f"{'engine':14}{'seconds':>9}{'gen tok/s':>11}{'convos/min':>12}")
        for name in ("transformers", "vllm"):
            r = s[name]
            print(f"{name:14}{r['seconds']:>9.1f}{r['tokens_per_s']:>11.1f}{r['convos_per_min']:>12.1f}")
        print(f"vllm / transformers: {s['vllm']['tokens_per_s'] / s['transformers']['tokens_per_s']:.2f}x "
              f"tokens/s; {s['identical_conversations']}/{s['conversations']} conversations token-identical")
    if args.only != "synth":
        s = bench_serve(args)
        figures["serve"] = s
        print(f"== serve: {args.users} concurrent users, {args.max_tokens} tokens each (greedy, "
              f"ignore_eos, streamed); ICL prompt {s['icl_prompt_tokens']} tokens; cartridge p={args.p}")
        print(f"{'engine/arm':24}{'tokens/s':>10}{'TTFT mean':>11}{'TTFT max':>10}{'wall s':>8}")
        for key in ("transformers/icl", "vllm/icl", "transformers/cartridge", "vllm/cartridge"):
            r = s[key]
            print(f"{key:24}{r['tokens_per_s']:>10.1f}{r['ttft_mean_s']:>10.2f}s{r['ttft_max_s']:>9.2f}s"
                  f"{r['wall_s']:>8.1f}")
        for arm in ("icl", "cartridge"):
            print(f"vllm / transformers, {arm}: "
                  f"{s[f'vllm/{arm}']['tokens_per_s'] / s[f'transformers/{arm}']['tokens_per_s']:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
