"""Benchmark: cart distill's training step against a plain forward+backward of the same model on
the same tokens, side by side in one run, at p = 64 and 512; plus packing vs padding and
float32 vs bfloat16 autocast (the choices cart distill makes), and peak memory.

Each measurement runs in its own process (peak RSS is per process). Run it alone: competing
CPU load skews 2-thread runs badly.

    python bench/distill.py [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "orbital" / "corpus.md"


def conversations(tok, n: int, seed: int = 0):
    """Conversation-shaped token sequences cut from the example corpus (lengths 120-420, like
    the example synth runs), with teacher targets (6 candidates) on their second half."""
    import random

    from cart.distill import Conversation

    ids = tok(EXAMPLE.read_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(120, 420)
        start = rng.randint(0, len(ids) - length)
        seq = ids[start:start + length]
        positions = list(range(length // 2, length))
        cands = [[seq[p], *(rng.randrange(len(tok)) for _ in range(5))] for p in positions]
        lps = [[-0.1, -3.0, -4.0, -5.0, -6.0, -7.0] for _ in positions]
        out.append(Conversation(f"b{i}", seq, positions, cands, lps))
    return out


def child(mode: str, p: int, dtype: str, steps: int, rows_per_step: int) -> dict:
    import torch

    from cart.cartridge import Cartridge
    from cart.distill import make_batch, pack
    from cart.trainable import TrainableCartridge
    from cart.models import load_model, load_tokenizer, resolve_model

    ref = resolve_model(None)
    tok = load_tokenizer(ref)
    model = load_model(ref)
    model.set_attn_implementation("sdpa")
    convos = conversations(tok, 64)
    lengths = [len(c.token_ids) for c in convos]
    packed_rows = pack(list(range(len(convos))), lengths, 1024)
    rows = [[i] for i in range(len(convos))] if mode == "cart-padded" else packed_rows
    layers, kvh, hd = model.config.num_hidden_layers, model.config.num_key_value_heads, 64
    gen = torch.Generator().manual_seed(0)

    def rand(n):
        return [torch.randn(kvh, n, hd, generator=gen) for _ in range(layers)]

    cart = Cartridge(rand(1), rand(1), rand(p - 1), rand(p - 1))
    module = TrainableCartridge(cart, model, "kl", dtype)
    opt = torch.optim.Adam(module.parameters(), lr=2e-2)
    embed = model.get_input_embeddings()
    tokens = 0
    seconds = 0.0
    step_rows = rows_per_step
    warmup = 1 if steps > 1 else 0  # a single timed step (the slow bfloat16 probe) runs cold
    for step in range(steps + warmup):
        batch_rows = [rows[(step * step_rows + j) % len(rows)] for j in range(step_rows)]
        batch = make_batch(batch_rows, convos, p, tok.pad_token_id, "cpu")
        t = time.perf_counter()
        if mode.startswith("cart"):
            loss, _, _ = module(batch, 1.0 / max(batch.num_targets, 1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:  # plain: the same token rows, causal attention, no cartridge, no mask
            ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
            with ac:
                x = embed(batch.input_ids).detach().requires_grad_(True)
                hidden = model.model(inputs_embeds=x, position_ids=batch.position_ids - p).last_hidden_state
                logits = model.lm_head(hidden[batch.target_rows, batch.target_cols])
            logp = torch.log_softmax(logits.float(), -1)
            loss = -(batch.cand_probs * logp.gather(1, batch.cand_ids)).sum() / max(batch.num_targets, 1)
            loss.backward()
        dt = time.perf_counter() - t
        if step >= warmup:
            tokens += batch.num_tokens
            seconds += dt
    return {"mode": mode, "p": p, "dtype": dtype, "tokens_per_s": tokens / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "steps": steps, "rows_per_step": step_rows, "tokens": tokens}


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True,
                         text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=5, metavar=("MODE", "P", "DTYPE", "STEPS", "ROWS"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="p=64 only, no bfloat16/padding runs")
    args = ap.parse_args()
    if args.child:
        mode, p, dtype, steps, rows = args.child
        print(json.dumps(child(mode, int(p), dtype, int(steps), int(rows))))
        return
    import torch

    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
          f"model SmolLM2-135M (embedded), 64 conversation-shaped sequences of 120-420 tokens "
          f"from {EXAMPLE.name}, packed into rows of 1024 tokens, 2 rows per step, "
          f"{args.steps} timed steps after 1 warm-up; nothing else should be running", flush=True)
    print(f"{'run':34} {'p':>4} {'dtype':>8} {'tok/s':>8} {'peak RSS':>9}  ratio", flush=True)
    ps = [64] if args.quick else [64, 512]
    for p in ps:
        plain = run_child("plain", p, "float32", args.steps, 2)
        cart = run_child("cart-packed", p, "float32", args.steps, 2)
        for r in (plain, cart):
            ratio = r["tokens_per_s"] / plain["tokens_per_s"]
            print(f"{'cart distill step (packed)' if r is cart else 'plain forward+backward':34} "
                  f"{p:4d} {r['dtype']:>8} {r['tokens_per_s']:8.1f} {r['peak_rss_mb']:7.0f}MB  "
                  f"{ratio:.2f}x", flush=True)
    if args.quick:
        return
    packed = run_child("cart-packed", 64, "float32", args.steps, 2)
    # about as many tokens per step as 2 packed rows: ~7 conversations of ~270 tokens
    padded = run_child("cart-padded", 64, "float32", args.steps, 7)
    print(f"packing vs padding (p=64, float32): packed {packed['tokens_per_s']:.1f} tok/s, "
          f"padded (one conversation per row) {padded['tokens_per_s']:.1f} tok/s: "
          f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x", flush=True)
    f32 = run_child("cart-padded", 64, "float32", 1, 1)
    bf16 = run_child("cart-padded", 64, "bfloat16", 1, 1)
    print(f"float32 vs bfloat16 autocast (p=64, one conversation, 1 cold step): float32 {f32['tokens_per_s']:.1f} "
          f"tok/s, bfloat16 {bf16['tokens_per_s']:.1f} tok/s: bfloat16 is "
          f"{bf16['tokens_per_s'] / f32['tokens_per_s']:.2f}x (cart distill --dtype auto picks "
          f"bfloat16 only on GPUs and CPUs with AVX512-BF16/AMX)", flush=True)


if __name__ == "__main__":
    main()
