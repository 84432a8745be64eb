"""Engines: generation and teacher top-k behind one seam, so the self-study algorithm, eval and
serve never depend on which library runs the model. ``get_engine(name, ...)`` builds one."""

from __future__ import annotations

from typing import Any

from cart.io import CartError

ENGINES = ("auto", "transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_runtime(engine: str, dtype: str) -> None:
    """For the configs of the stages that generate: the engine and its dtype, by name."""
    if engine not in ENGINES:
        raise CartError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if dtype not in DTYPES:
        raise CartError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {dtype!r}")


def resolve_runtime(engine: str, dtype: str, device: str, biases: bool = False) -> tuple[str, str]:
    """``auto`` made concrete for a (resolved) device: the engine is vLLM where it is
    importable and the device is a GPU, unless the cartridges carry attention biases
    (``biases``: compacted ones, which vLLM refuses), else transformers; the dtype bfloat16 on
    a GPU, else float32 (bfloat16 generation on a CPU has not been measured to pay)."""
    check_runtime(engine, dtype)
    gpu = device.startswith("cuda")
    if engine == "auto":
        import importlib.util

        vllm = gpu and not biases and importlib.util.find_spec("vllm") is not None
        engine = "vllm" if vllm else "transformers"
    return engine, ("bfloat16" if gpu else "float32") if dtype == "auto" else dtype


def with_runtime(cfg: Any, biases: bool = False) -> Any:
    """A stage config (``engine``, ``dtype``, ``device`` fields) with its engine and dtype made
    concrete, so outputs record what ran (``biases``: as ``resolve_runtime``)."""
    from dataclasses import replace

    from cart.models import resolve_device

    engine, dtype = resolve_runtime(cfg.engine, cfg.dtype, resolve_device(cfg.device), biases)
    return replace(cfg, engine=engine, dtype=dtype)


def get_engine(name: str, model: str | None, dtype: str = "auto", device: str = "cpu",
               console: Any = None, top_k: int = 0):
    """``top_k``: the most teacher log-probs a request will ask for (vLLM reserves room for
    them when it starts: its ``max_logprobs``). ``name`` and ``dtype`` may be ``auto``
    (``resolve_runtime``)."""
    name, dtype = resolve_runtime(name, dtype, device)
    if name == "transformers":
        from cart.engines.hf import TransformersEngine

        return TransformersEngine.load(model, dtype=dtype, device=device, console=console)
    if name == "vllm":
        from cart.engines.vllm import VLLMEngine

        return VLLMEngine.load(model, dtype=dtype, device=device, console=console,
                               max_logprobs=max(20, top_k))
    raise AssertionError(f"engine {name!r} is in ENGINES but not built here")
