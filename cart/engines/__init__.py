"""Engines: generation and teacher top-k behind one seam, so the self-study algorithm, eval and
serve never depend on which library runs the model. ``get_engine(name, ...)`` builds one."""

from __future__ import annotations

from typing import Any

from cart.io import CartError

ENGINES = ("transformers", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


def check_runtime(engine: str, dtype: str) -> None:
    """For the configs of the stages that generate: the engine and its dtype, by name."""
    if engine not in ENGINES:
        raise CartError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if dtype not in DTYPES:
        raise CartError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {dtype!r}")


def get_engine(name: str, model: str | None, dtype: str = "float32", device: str = "cpu",
               console: Any = None, top_k: int = 0):
    """``top_k``: the most teacher log-probs a request will ask for (vLLM reserves room for
    them when it starts: its ``max_logprobs``)."""
    check_runtime(name, dtype)
    if name == "transformers":
        from cart.engines.hf import TransformersEngine

        return TransformersEngine.load(model, dtype=dtype, device=device, console=console)
    if name == "vllm":
        from cart.engines.vllm import VLLMEngine

        return VLLMEngine.load(model, dtype=dtype, device=device, console=console,
                               max_logprobs=max(20, top_k))
    raise AssertionError(f"engine {name!r} is in ENGINES but not built here")
