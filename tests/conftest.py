"""Shared fixtures: tiny in-process models saved as HF folders, and a runner for the real
``cart`` entry point (a subprocess, as a user runs it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Tests of the vLLM engine: skipped where vLLM is not installed, unless CART_REQUIRE_VLLM=1
# (make test, which installs it), where a missing vLLM fails them instead.
NEEDS_VLLM = pytest.mark.skipif(
    os.environ.get("CART_REQUIRE_VLLM") != "1" and importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (make test installs it)")
VLLM = [pytest.mark.vllm, NEEDS_VLLM]
CART = Path(sys.executable).parent / "cart"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    """A different model (3 layers): cartridges of `tiny_model` must be refused by it."""
    return build_tiny_model(tmp_path_factory.mktemp("other-tiny-model"), seed=1, layers=3)


@pytest.fixture(scope="session")
def cart_home(tmp_path_factory) -> Path:
    """CART_HOME for tests that never need the real model (no conversion happens there)."""
    return tmp_path_factory.mktemp("cart-home")


@pytest.fixture
def run_cart(cart_home):
    """Run ``cart ARGS`` with optional stdin bytes; returns the CompletedProcess (bytes)."""

    def run(*args, input: bytes | None = None, cwd: Path | None = None, env: dict | None = None):
        full_env = {**os.environ, "CART_HOME": str(cart_home), **(env or {})}
        full_env.pop("CART_DEBUG", None)
        return subprocess.run([str(CART), *map(str, args)], input=input if input is not None else b"",
                              capture_output=True, cwd=cwd, env=full_env, timeout=600)

    return run


def one_line_error(proc) -> str:
    """Assert the process failed with exactly one line on stderr and no traceback; return it."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cart: error: "), err
    return lines[0]
