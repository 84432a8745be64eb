"""Engines: generation and teacher top-k behind one seam, so the self-study algorithm, eval and
serve never depend on which library runs the model. ``get_engine(name, ...)`` builds one."""

from __future__ import annotations

from typing import Any

from cart.io import CartError

ENGINES = ("transformers",)


def get_engine(name: str, model: str | None, dtype: str = "float32", device: str = "cpu",
               console: Any = None):
    if name == "transformers":
        from cart.engines.hf import TransformersEngine

        return TransformersEngine.load(model, dtype=dtype, device=device, console=console)
    raise CartError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
