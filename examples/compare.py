"""No context vs the corpus in context (ICL) vs cartridges, side by side on a question set.

    python examples/compare.py QUESTIONS.jsonl CORPUS [CARTRIDGE ...] [--json OUT.json]

For every method: questions answered (greedy, normalized "contains" / multiple choice), the
mean log-probability per token of the reference answers (teacher-forced), KV positions and the
compression ratio against ICL. (``cart eval`` will grow out of this; see cart/scoring.py.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("questions")
    ap.add_argument("corpus")
    ap.add_argument("cartridges", nargs="*")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", default=None, help="write per-method summaries and answers here")
    ap.add_argument("--no-icl", action="store_true", help="skip the ICL baseline")
    ap.add_argument("--no-baselines", action="store_true", help="cartridges only")
    ap.add_argument("--first-tokens", type=int, action="append", default=[],
                    help="also the KV of the corpus's first N tokens, untrained (what --init "
                         "corpus starts from); repeatable")
    args = ap.parse_args()

    import orjson
    import torch

    from cart.cartridge import Cartridge
    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model
    from cart.scoring import Prefix, cartridge_prefix, evaluate, icl_prefix
    from cart.synth import SYSTEM_TEMPLATE

    torch.set_grad_enabled(False)
    ref = resolve_model(args.model)
    tok = load_tokenizer(ref)
    model = load_model(ref)
    identity = ModelIdentity.of(ref, model.config, tok)
    questions = [orjson.loads(line) for line in Path(args.questions).read_bytes().splitlines()
                 if line.strip()]
    corpus = Path(args.corpus).read_text(encoding="utf-8")
    prefixes = [] if args.no_baselines else [Prefix("no context", None, 0)]
    if not (args.no_icl or args.no_baselines):
        prefixes.append(icl_prefix(model, tok, SYSTEM_TEMPLATE.format(chunk=corpus), "ICL (full corpus)"))
    corpus_ids = tok(corpus, add_special_tokens=False)["input_ids"]
    for n in args.first_tokens:
        from cart.kvcache import prefix_kv

        prefixes.append(Prefix(f"first {n} tokens (untrained)",
                               prefix_kv(model, torch.tensor(corpus_ids[:n])), n))
    for path in args.cartridges:
        prefixes.append(cartridge_prefix(Cartridge.load(path, expect=identity), Path(path).stem))
    corpus_tokens = len(corpus_ids)
    summary = []
    print(f"{'method':32} {'KV tokens':>9} {'vs corpus':>9} {'answered':>10} {'logprob/tok':>11} {'s':>5}",
          file=sys.stderr)
    for prefix in prefixes:
        t = time.perf_counter()
        rows = evaluate(model, tok, prefix, questions, args.max_new_tokens)
        n_tok = sum(r["answer_tokens"] for r in rows)
        s = {"method": prefix.name, "kv_tokens": prefix.tokens,
             "compression": round(corpus_tokens / prefix.tokens, 2) if prefix.tokens else None,
             "answered": sum(r["score"] for r in rows), "questions": len(rows),
             "logprob_per_token": sum(r["answer_logprob"] for r in rows) / n_tok,
             "seconds": round(time.perf_counter() - t, 1), "rows": rows}
        summary.append(s)
        ratio = f"{s['compression']}x" if s["compression"] else "-"
        print(f"{prefix.name[:32]:32} {prefix.tokens:9d} {ratio:>9} "
              f"{int(s['answered']):4d}/{len(rows):<5d} {s['logprob_per_token']:11.3f} "
              f"{s['seconds']:5.0f}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"corpus_tokens": corpus_tokens,
                                               "methods": summary}, indent=1))


if __name__ == "__main__":
    main()
