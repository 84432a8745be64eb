"""Benchmark: loading the embedded model from its GGUF file (the first run) against loading the
cached HF folder cart converts it into (every later run), measured side by side in one run.

Run alone: competing CPU load skews timings on a 2-core machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from cart.io import Console
    from cart.models import load_model, load_tokenizer, resolve_model

    home = Path(tempfile.mkdtemp(prefix="cart-bench-"))
    os.environ["CART_HOME"] = str(home)  # a cold cache: the first resolve converts
    try:
        t0 = time.perf_counter()
        ref = resolve_model(None, Console(quiet=True))
        convert_s = time.perf_counter() - t0
        load_tokenizer.cache_clear()
        t0 = time.perf_counter()
        load_tokenizer(ref)
        load_model(ref)
        cached_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, model {ref.model_id}, fp32")
    print(f"first run  (GGUF dequantise + convert + save): {convert_s:7.2f} s")
    print(f"later runs (cached HF folder: tokenizer + weights): {cached_s:7.2f} s")
    print(f"ratio: cached load is {convert_s / cached_s:.0f}x faster")


if __name__ == "__main__":
    main()
