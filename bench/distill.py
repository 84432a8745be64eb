"""Benchmark: cart distill's training step against a plain forward+backward of the same model on
the same tokens, side by side in one run, at p = 64 and 512; plus packing vs padding and
float32 vs bfloat16 autocast (the choices cart distill makes), peak memory, and MFU.

Each measurement runs in its own process (peak memory is per process). Run it alone: competing
load skews the timings (2-thread CPU runs badly).

    python bench/distill.py [--steps N] [--quick] [--model M] [--device D] [--dtype T]
                            [--peak-tflops X] [--json FILE]

--model: anything ``cart.models.resolve_model`` accepts (default: the embedded SmolLM2): a local
Hugging Face folder (config.json + safetensors + tokenizer files, e.g. a random-weight model of a
real architecture built by ../shared/gpu/make_model.py on a host without network), a .gguf file.
--device: cpu, cuda, cuda:N or auto; the model, the cartridge and every batch live there.
--dtype: as ``cart distill --dtype`` (``cart.distill.compute_dtype``): the model is loaded in
float32 and, with bfloat16, runs under bfloat16 autocast (on CUDA its frozen weights are then
held in bfloat16, as cart distill holds them); auto = bfloat16 on GPUs and on CPUs
with AVX512-BF16/AMX, else float32.

Timing: only the training step (forward, backward, Adam step) is timed, after a warm-up step,
with ``torch.cuda.synchronize()`` on both sides on CUDA; building the batch (CPU work and the
copy to the device) is not. Peak memory: peak RSS of the process on CPU,
``torch.cuda.max_memory_allocated()`` on CUDA (weights included).

MFU (model FLOPs utilisation) = model FLOPs per second / the device's peak. Model FLOPs of a
step, counted from the batch (real tokens only: padding and masked-out attention excluded):
- linear layers of the frozen model: 4 x N FLOPs per token, N = its non-embedding parameters
  (2N forward, 2N backward to the activations; the weights get no gradient, so no 2N for
  weight gradients as in the usual 6N);
- LM head: 4 x vocab x hidden per *target* token (cart distill applies it only there);
- attention: 12 x layers x heads x head_dim FLOPs per (query, key) pair attended -- QK^T and PV
  forward (2 x 2) plus twice that backward (gradients to both operands: the queries, and the
  keys/values of the tokens and of the trained cartridge). A token of a conversation of n tokens
  at index i attends to p cartridge tokens + i + 1 of its own (cart distill: causal within its
  conversation); the plain baseline attends causally over its whole packed row (no cartridge).
Peak: --peak-tflops if given; else, on a GPU named in PEAK_TFLOPS below, its spec-sheet dense
figure for the dtype (bfloat16: tensor cores; float32: non-tensor, as torch's default
``allow_tf32=False``); else (a CPU, an unknown GPU) *measured*: the best rate of a large square
matmul in the run's dtype on the device, in this run. The output says which.
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
SEQ_LEN = 1024  # packed row length

# Dense spec-sheet TFLOP/s by dtype (bfloat16: tensor cores, no sparsity; float32: non-tensor
# FP32), matched in order against torch.cuda.get_device_name().lower().
PEAK_TFLOPS = [
    ("h200", {"bfloat16": 989.5, "float32": 66.9}),
    ("h100 pcie", {"bfloat16": 756.0, "float32": 51.2}),
    ("h100 nvl", {"bfloat16": 835.0, "float32": 60.0}),
    ("h100", {"bfloat16": 989.5, "float32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("a100", {"bfloat16": 312.0, "float32": 19.5}),
]


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


def model_shape(model) -> dict:
    """What the FLOP count needs: non-embedding parameters, layers, heads, head dim, hidden,
    vocabulary (the LM head's rows)."""
    from cart.models import kv_shape

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(t.numel() for t in model.parameters())  # tied weights counted once
    non_embedding = total - embed.numel() - (0 if head is embed else head.numel())
    layers, kv_heads, head_dim = kv_shape(cfg)
    return {"params": total, "non_embedding_params": non_embedding, "layers": layers,
            "heads": cfg.num_attention_heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "hidden": cfg.hidden_size, "vocab": head.shape[0]}


def step_flops(shape: dict, rows: list[list[int]], p: int, targets: int, cartridge: bool) -> int:
    """Model FLOPs of one training step on ``rows`` (each a list of conversation lengths), see
    the module docstring."""
    tokens = sum(sum(row) for row in rows)
    if cartridge:  # each conversation: p cartridge keys + causal over its own tokens
        pairs = sum(n * p + n * (n + 1) // 2 for row in rows for n in row)
    else:  # plain: causal over the whole row
        pairs = sum(sum(row) * (sum(row) + 1) // 2 for row in rows)
    return (4 * shape["non_embedding_params"] * tokens
            + 4 * shape["vocab"] * shape["hidden"] * targets
            + 12 * shape["layers"] * shape["heads"] * shape["head_dim"] * pairs)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak(device: str, dtype: str) -> dict:
    """The device's measured matmul rate in ``dtype``: square matrices doubled in size until
    one product takes 50 ms (or 4096 on a CPU, 8192 on a GPU), then the best of several."""
    import torch

    dt_ = getattr(torch, dtype)
    n, cap = 256, 8192 if device.startswith("cuda") else 4096
    while True:
        a = torch.randn(n, n, device=device, dtype=dt_)
        b = torch.randn(n, n, device=device, dtype=dt_)
        a @ b  # first call: allocations, kernel selection
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        one = time.perf_counter() - t
        if one > 0.05 or n >= cap:
            break
        n *= 2
    best = one
    for _ in range(max(3, min(20, int(0.5 / max(one, 1e-6))))):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"tflops": 2 * n**3 / best / 1e12, "n": n}


def child(mode: str, p: int, dtype: str, steps: int, rows_per_step: int, model_spec: str | None,
          device: str) -> dict:
    import torch

    from cart.cartridge import Cartridge
    from cart.distill import make_batch, pack
    from cart.models import load_model, load_tokenizer, resolve_model
    from cart.trainable import TrainableCartridge

    ref = resolve_model(model_spec)
    tok = load_tokenizer(ref)
    model = load_model(ref, dtype="float32", device=device)  # as cart distill loads it
    model.set_attn_implementation("sdpa")
    shape = model_shape(model)
    convos = conversations(tok, 64)
    lengths = [len(c.token_ids) for c in convos]
    packed_rows = pack(list(range(len(convos))), lengths, SEQ_LEN)
    rows = [[i] for i in range(len(convos))] if mode == "cart-padded" else packed_rows
    layers, kvh, hd = shape["layers"], shape["kv_heads"], shape["head_dim"]
    gen = torch.Generator().manual_seed(0)

    def rand(n):
        return [torch.randn(kvh, n, hd, generator=gen) for _ in range(layers)]

    cart = Cartridge(rand(1), rand(1), rand(p - 1), rand(p - 1))
    module = TrainableCartridge(cart, model, "kl", dtype).place(device)
    opt = torch.optim.Adam(module.parameters(), lr=2e-2)
    embed = model.get_input_embeddings()
    tokens = flops = 0
    seconds = 0.0
    step_rows = rows_per_step
    warmup = 1 if steps > 1 else 0  # a single timed step (the slow bfloat16 probe) runs cold
    for step in range(steps + warmup):
        batch_rows = [rows[(step * step_rows + j) % len(rows)] for j in range(step_rows)]
        batch = make_batch(batch_rows, convos, p, tok.pad_token_id, device)
        sync(device)
        t = time.perf_counter()
        if mode.startswith("cart"):
            loss, _, _ = module(batch, 1.0 / max(batch.num_targets, 1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:  # plain: the same token rows, causal attention, no cartridge, no mask
            ac = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                enabled=dtype == "bfloat16")
            with ac:
                x = embed(batch.input_ids).detach().requires_grad_(True)
                hidden = model.model(inputs_embeds=x, position_ids=batch.position_ids - p).last_hidden_state
                logits = model.lm_head(hidden[batch.target_rows, batch.target_cols])
            logp = torch.log_softmax(logits.float(), -1)
            loss = -(batch.cand_probs * logp.gather(1, batch.cand_ids)).sum() / max(batch.num_targets, 1)
            loss.backward()
        sync(device)
        dt = time.perf_counter() - t
        if step >= warmup:
            tokens += batch.num_tokens
            seconds += dt
            flops += step_flops(shape, [[lengths[i] for i in row] for row in batch_rows], p,
                                batch.num_targets, mode.startswith("cart"))
    return {"mode": mode, "p": p, "dtype": dtype, "tokens_per_s": tokens / seconds,
            "model_tflops": flops / seconds / 1e12, "flops_per_token": flops / tokens,
            "peak_mem_mb": peak_memory_mb(device), "steps": steps, "rows_per_step": step_rows,
            "tokens": tokens, "seconds": seconds, "shape": shape, "model_id": ref.model_id}


def run_child(**kw) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(kw)], capture_output=True,
                         text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def spec_peak(device: str, dtype: str) -> tuple[float, str] | None:
    """(TFLOP/s, source) from PEAK_TFLOPS for this GPU, or None."""
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    for key, figures in PEAK_TFLOPS:
        if key in name.lower() and dtype in figures:
            kind = "dense bfloat16 tensor-core" if dtype == "bfloat16" else "float32 non-tensor"
            return figures[dtype], f"spec sheet of {name} ({kind})"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per run, after 1 warm-up (default 2 on a CPU, 10 on a GPU)")
    ap.add_argument("--rows", type=int, default=None,
                    help=f"packed rows of {SEQ_LEN} tokens per step (default 2 on a CPU, 8 on a GPU)")
    ap.add_argument("--quick", action="store_true", help="p=64 only, no bfloat16/padding runs")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="cart distill's --dtype (default auto)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for MFU (default: a known GPU's spec sheet, "
                         "else measured with a large matmul in this run)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.child:
        kw = json.loads(args.child)
        mode = kw.pop("mode")
        if mode == "peak":
            print(json.dumps(child_peak(kw["device"], kw["dtype"])))
        else:
            print(json.dumps(child(mode, **kw)))
        return
    import torch

    from cart.distill import compute_dtype
    from cart.models import resolve_device, resolve_model

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    dtype = compute_dtype(args.dtype, device)
    steps = args.steps or (10 if cuda else 2)
    rows = args.rows or (8 if cuda else 2)
    resolve_model(args.model)  # convert a GGUF (the embedded default) once, before any timing
    common = {"steps": steps, "rows_per_step": rows, "model_spec": args.model, "device": device}

    peaks: dict[str, tuple[float, str]] = {}

    def peak(dt: str) -> tuple[float, str]:
        if dt not in peaks:
            if args.peak_tflops:
                peaks[dt] = (args.peak_tflops, "--peak-tflops")
            else:
                got = spec_peak(device, dt)
                if got is None:
                    m = run_child(mode="peak", device=device, dtype=dt)
                    got = (m["tflops"], f"measured here: best {m['n']}x{m['n']} {dt} matmul on {device}")
                peaks[dt] = got
        return peaks[dt]

    if cuda:
        hw = f"{torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}"
    else:
        hw = f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} threads, " \
             f"{torch.backends.cpu.get_cpu_capability()}"
    first = run_child(mode="plain", p=64, dtype=dtype, **common)
    shape = first["shape"]
    pk, pk_source = peak(dtype)
    print(f"machine: {hw}; torch {torch.__version__}; {device}, {dtype}; model {first['model_id']} "
          f"({shape['params'] / 1e6:.0f}M parameters, {shape['non_embedding_params'] / 1e6:.0f}M "
          f"non-embedding, {shape['layers']} layers, {shape['heads']} heads x {shape['head_dim']}, "
          f"{shape['kv_heads']} KV heads); 64 conversation-shaped sequences of 120-420 tokens "
          f"from {EXAMPLE.name}, packed into rows of {SEQ_LEN} tokens, {rows} rows per step, "
          f"{steps} timed steps after {'1 warm-up' if steps > 1 else 'none (cold)'}; nothing else "
          f"should be running", flush=True)
    print(f"MFU peak: {pk:.4g} TFLOP/s ({pk_source}); model FLOPs: 4 x non-embedding params per "
          f"token + LM head at targets + attention (see the docstring)", flush=True)
    mem = "GPU peak" if cuda else "peak RSS"
    print(f"{'run':34} {'p':>4} {'dtype':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>7} {mem:>9}  ratio",
          flush=True)
    results = []

    def show(label: str, r: dict, base: dict | None) -> None:
        mfu = r["model_tflops"] / peak(r["dtype"])[0]
        r["mfu"], r["peak_tflops"], r["peak_source"] = mfu, *peak(r["dtype"])
        r["label"] = label
        results.append(r)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        print(f"{label:34} {r['p']:4d} {r['dtype']:>8} {r['tokens_per_s']:9.1f} "
              f"{r['model_tflops']:8.4g} {mfu:6.1%} {r['peak_mem_mb']:7.0f}MB  {ratio}", flush=True)

    summary, packed = {}, None
    for p in [64] if args.quick else [64, 512]:
        plain = first if p == 64 else run_child(mode="plain", p=p, dtype=dtype, **common)
        cart = run_child(mode="cart-packed", p=p, dtype=dtype, **common)
        packed = packed or cart
        show("plain forward+backward", plain, plain)
        show("cart distill step (packed)", cart, plain)
        summary[f"cart_over_plain_p{p}"] = cart["tokens_per_s"] / plain["tokens_per_s"]
    if not args.quick:
        # about as many tokens per step as the packed rows: ~3.5 conversations of ~270 tokens each
        padded = run_child(mode="cart-padded", p=64, dtype=dtype,
                           **{**common, "rows_per_step": max(1, round(rows * 3.5))})
        show("cart distill step (padded)", padded, packed)
        summary["packed_over_padded"] = packed["tokens_per_s"] / padded["tokens_per_s"]
        print(f"packing vs padding (p=64, {dtype}): packed {packed['tokens_per_s']:.1f} tok/s, "
              f"padded (one conversation per row) {padded['tokens_per_s']:.1f} tok/s: "
              f"{summary['packed_over_padded']:.2f}x", flush=True)
        # bfloat16 without native support (AVX2 CPUs) is ~100x slower: a single cold step there
        native = cuda or compute_dtype("auto", device) == "bfloat16"
        probe = {**common, "steps": steps if native else 1, "rows_per_step": rows if native else 1}
        f32 = run_child(mode="cart-padded" if not native else "cart-packed", p=64, dtype="float32", **probe)
        bf16 = run_child(mode="cart-padded" if not native else "cart-packed", p=64, dtype="bfloat16", **probe)
        show("cart distill step, float32", f32, None)
        show("cart distill step, bfloat16", bf16, f32)
        summary["bfloat16_over_float32"] = bf16["tokens_per_s"] / f32["tokens_per_s"]
        how = f"{probe['steps']} timed steps" if native else "one conversation, 1 cold step"
        print(f"float32 vs bfloat16 autocast (p=64, {how}): float32 {f32['tokens_per_s']:.1f} "
              f"tok/s, bfloat16 {bf16['tokens_per_s']:.1f} tok/s: bfloat16 is "
              f"{summary['bfloat16_over_float32']:.2f}x (cart distill --dtype auto picks "
              f"bfloat16 only on GPUs and CPUs with AVX512-BF16/AMX)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "conditions": {**vars(args), "device": device, "dtype": dtype, "steps": steps,
                           "rows": rows, "seq_len": SEQ_LEN, "hardware": hw,
                           "torch": torch.__version__, "model_id": first["model_id"], "shape": shape},
            "peaks": {k: {"tflops": v[0], "source": v[1]} for k, v in peaks.items()},
            "runs": results, **summary}, indent=2))


if __name__ == "__main__":
    main()
