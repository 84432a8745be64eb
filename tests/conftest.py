"""Shared fixtures: tiny in-process models saved as HF folders, and runners for the real
``cart`` entry point: in this process (``run_cart``, fast) or as a subprocess, as a user runs
it (``run_cart_subprocess``, for what only a real process shows)."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
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
    """Run ``cart ARGS`` in this process (see ``run_cart_in_process``) with optional stdin
    bytes; returns a CompletedProcess-like result (returncode, stdout and stderr as bytes)."""

    def run(*args, input: bytes | None = None, cwd: Path | None = None, env: dict | None = None):
        return run_cart_in_process(*args, input=input, cwd=cwd,
                                   env={"CART_HOME": str(cart_home), **(env or {})})

    return run


@pytest.fixture
def run_cart_subprocess(cart_home):
    """Run the real ``cart`` executable as a subprocess, as a user runs it: for the end-to-end
    tests of what only a process has (its exit status, pipes between processes, signals)."""

    def run(*args, input: bytes | None = None, cwd: Path | None = None, env: dict | None = None):
        full_env = {**os.environ, "CART_HOME": str(cart_home), **(env or {})}
        full_env.pop("CART_DEBUG", None)
        return subprocess.run([str(CART), *map(str, args)], input=input if input is not None else b"",
                              capture_output=True, cwd=cwd, env=full_env, timeout=600)

    return run


# -- running the entry point in this process ---------------------------------------------------
# A subprocess per call costs a Python start and the imports of torch and transformers (about a
# second each, ~100 calls). ``run_cart_in_process`` calls the function the ``cart`` script runs
# (cart.cli:main, [project.scripts]) with what a fresh process would have: the arguments in
# sys.argv, stdin/stdout/stderr of its own (bytes, not terminals), the environment and working
# directory given, warnings shown on stderr with an interpreter's default filters (not
# recorded by pytest), logging handlers writing to its stderr, the default torch RNG, and no
# cached tokenizers. Everything is put back afterwards, however the run ends.

# What pytest puts in front of the filters for each test; a cart process has neither.
_PYTEST_FILTERS = [("always", None, DeprecationWarning, None, 0),
                   ("always", None, PendingDeprecationWarning, None, 0)]


def _process_filters(known: list) -> list:
    """The filters a cart process would have: the interpreter's defaults and those its
    imports added (``known``: gathered so far, as imports run in tests or in earlier runs),
    without pytest's own."""
    if sys.warnoptions:  # python -W ...: not passed on to a cart process
        return list(known)
    now = [f for f in warnings.filters if f not in _PYTEST_FILTERS]
    return [f for f in now if f not in known] + known


_PROCESS_WARNING_FILTERS = _process_filters([])
_TORCH_DEFAULT_SEED = 67280421310721  # torch.initial_seed() of a fresh process


def _show_warning_on_stderr(msg) -> None:
    """warnings' own way to show a warning (``_showwarnmsg_impl``): on sys.stderr."""
    file = msg.file if msg.file is not None else sys.stderr
    try:
        file.write(warnings._formatwarnmsg(msg))
    except OSError:
        pass


class _Stream(io.BytesIO):
    def close(self) -> None:  # closing stdout in the run must not lose what was written
        self.flush()


def _text_stream(data: bytes = b"", errors: str = "strict") -> io.TextIOWrapper:
    # UTF-8 as a C.UTF-8/UTF-8-locale process; write_through keeps print() and writes to
    # .buffer in order, as PYTHONUNBUFFERED or a final flush would
    return io.TextIOWrapper(_Stream(data), encoding="utf-8", errors=errors, write_through=True)


def _all_loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                   if isinstance(lg, logging.Logger))]


def _stream_handlers() -> list[logging.StreamHandler]:
    return [h for lg in _all_loggers() for h in lg.handlers if isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler)]


def _clear_cart_caches() -> None:
    """functools caches of cart's modules (a fresh process starts without them)."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "cart" or name.startswith("cart.")):
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == name:
                value.cache_clear()


def run_cart_in_process(*args, input: bytes | None = None, cwd: Path | None = None,
                        env: dict | None = None) -> subprocess.CompletedProcess:
    """``cart ARGS`` through the real entry point (cart.cli.main), in this process. ``env``
    is added to the environment (CART_DEBUG is removed, as in the subprocess runner)."""
    import cart.cli

    argv = [str(a) for a in args]
    stdin = _text_stream(input or b"")
    stdout, stderr = _text_stream(), _text_stream(errors="backslashreplace")
    saved_streams = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), os.environ.copy()
    saved_signals = {s: signal.getsignal(s) for s in _SIGNALS}
    loggers = {lg: (lg.level, lg.propagate, lg.disabled, list(lg.handlers)) for lg in _all_loggers()}
    logging_disabled = logging.root.manager.disable
    # handlers that write to this process's stdout/stderr write to the run's
    redirected = {h: h.stream for h in _stream_handlers()
                  if h.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    torch = sys.modules.get("torch")
    rng = torch.get_rng_state() if torch is not None else None
    code: int | None = 0
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        os.environ.pop("CART_DEBUG", None)
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = [str(CART), *argv]
        # sys.__stdout__ too: shutil.get_terminal_size() (click's help width) asks it
        sys.stdin = sys.__stdin__ = stdin
        sys.stdout = sys.__stdout__ = stdout
        sys.stderr = sys.__stderr__ = stderr
        for handler, stream in redirected.items():
            handler.setStream(stdout if stream in (saved_streams[1], saved_streams[4]) else stderr)
        if torch is not None:
            torch.manual_seed(_TORCH_DEFAULT_SEED)
        with warnings.catch_warnings():
            warnings.filters[:] = _PROCESS_WARNING_FILTERS[:] = _process_filters(_PROCESS_WARNING_FILTERS)
            getattr(warnings, "_filters_mutated", lambda: None)()  # "default": shown again
            warnings.showwarning = getattr(warnings, "_showwarning_orig", warnings.showwarning)
            warnings._showwarnmsg_impl = _show_warning_on_stderr
            try:
                cart.cli.main(argv)
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # uncaught, as the interpreter reports it (CART_DEBUG)
                traceback.print_exc(file=stderr)
                code = 1
            finally:
                _PROCESS_WARNING_FILTERS[:] = warnings.filters  # what imports added stays
    finally:
        (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__,
         sys.__stderr__) = saved_streams
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for key in [k for k in os.environ if k not in saved_env]:
            del os.environ[key]
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        for s, handler in saved_signals.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)
        for lg, (level, propagate, disabled, handlers) in loggers.items():
            lg.setLevel(level)
            lg.propagate, lg.disabled, lg.handlers[:] = propagate, disabled, handlers
        logging.disable(logging_disabled)
        for handler in _stream_handlers():  # also those made during the run, on its streams
            if handler in redirected:
                handler.setStream(redirected[handler])
            elif handler.stream is stdout or handler.stream is stderr:
                handler.setStream(saved_streams[1] if handler.stream is stdout else saved_streams[2])
        if rng is not None:
            torch.set_rng_state(rng)
        elif "torch" in sys.modules:  # imported by the run: as fresh as an import leaves it
            sys.modules["torch"].manual_seed(_TORCH_DEFAULT_SEED)
        _clear_cart_caches()
    return subprocess.CompletedProcess(["cart", *argv], code, stdout.buffer.getvalue(),
                                       stderr.buffer.getvalue())


_SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "SIGQUIT",
                                         "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")
            if hasattr(signal, n)]


def one_line_error(proc) -> str:
    """Assert the process failed with exactly one line on stderr and no traceback; return it."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cart: error: "), err
    return lines[0]


def cloze_parts(text: str) -> tuple[str, str]:
    """(the variant a cloze prompt was written from, the cue it quotes)."""
    from cart.seeds.cloze import VARIANTS

    cue = text.split('"')[1].removesuffix(" ...")
    template = next(v for v in VARIANTS if v.format(cue=cue) == text)
    return template, cue
