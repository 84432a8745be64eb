"""Shared file plumbing for every stage: JSONL in/out, ``-`` for stdin/stdout, record schemas,
atomic writes, and the stderr console.

This module imports nothing of ``cart`` (every stage and the core build on it), and nothing
heavy, so that ``cart --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

STDIO = "-"

# The record kinds cart reads and writes, with the major version this build understands.
# A reader accepts any minor version of a known major (additive changes) and refuses others.
SCHEMA_VERSIONS: dict[str, int] = {
    "chunk": 1,
    "convo": 1,
    "questions": 1,
    "result": 1,
}


class CartError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints it as one line (``cart: error: <message>``) and exits non-zero, without a
    traceback. Messages name the file, line and field at fault.
    """

    exit_code = 1


def display_name(path: str | os.PathLike | None) -> str:
    """How a path is named in messages: ``<stdin>``/``<stdout>`` for ``-``."""
    if path is None or str(path) == STDIO:
        return "<stdin>"
    return str(path)


def schema_id(kind: str, version: int | None = None) -> str:
    return f"cart.{kind}/{version if version is not None else SCHEMA_VERSIONS[kind]}"


def check_schema(record: Any, kind: str, where: str) -> None:
    """Refuse a record that is not a ``cart.<kind>`` record of a supported major version.

    ``where`` is ``FILE:LINE`` and starts every message.
    """
    if not isinstance(record, dict):
        raise CartError(f"{where}: expected a JSON object, got {type(record).__name__}")
    schema = record.get("schema")
    if schema is None:
        raise CartError(f"{where}: missing field 'schema' (expected {schema_id(kind)})")
    if not isinstance(schema, str) or not schema.startswith("cart.") or "/" not in schema:
        raise CartError(f"{where}: field 'schema' is {schema!r}, expected {schema_id(kind)}")
    got_kind, _, version = schema[len("cart."):].partition("/")
    if got_kind != kind:
        raise CartError(f"{where}: expected a {schema_id(kind)} record, got {schema}")
    major = version.split(".", 1)[0]
    if not major.isdigit():
        raise CartError(f"{where}: field 'schema' has a malformed version: {schema!r}")
    if int(major) != SCHEMA_VERSIONS[kind]:
        raise CartError(
            f"{where}: unsupported schema version {schema} "
            f"(this cart reads {schema_id(kind)}; upgrade cart or regenerate the file)"
        )


def require(record: dict, field: str, types: type | tuple[type, ...], where: str) -> Any:
    """Return ``record[field]``, or raise a CartError naming the place and the field."""
    if field not in record:
        raise CartError(f"{where}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise CartError(f"{where}: field '{field}' must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


@dataclass(frozen=True)
class Line:
    """One parsed JSONL record and where it came from (for error messages)."""

    source: str
    lineno: int
    record: dict

    @property
    def where(self) -> str:
        return f"{self.source}:{self.lineno}"


def open_input_bytes(path: str | os.PathLike) -> IO[bytes]:
    """Open a file (or stdin for ``-``) for binary reading, with a one-line error if missing."""
    if str(path) == STDIO:
        return contextlib.nullcontext(sys.stdin.buffer)  # type: ignore[return-value]
    p = Path(path)
    if not p.exists():
        raise CartError(f"{p}: no such file or directory")
    if p.is_dir():
        raise CartError(f"{p}: is a directory, expected a file")
    try:
        return open(p, "rb")
    except OSError as e:
        raise CartError(f"{p}: cannot open: {e.strerror}") from None


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> Iterator[Line]:
    """Yield the records of a JSONL file (``-`` = stdin), checking their schema if ``kind``.

    Blank lines are skipped. Malformed lines raise a CartError naming the file and line.
    """
    with open_input_bytes(path) as f:
        yield from parse_jsonl(f, display_name(path), kind)


def parse_jsonl(lines: Iterable[bytes], source: str, kind: str | None = None) -> Iterator[Line]:
    """The records of JSONL ``lines`` (bytes) read from ``source`` (named in errors)."""
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise CartError(f"{source}:{lineno}: invalid JSON ({e.args[0]})") from None
        line = Line(source, lineno, record)
        if kind is not None:
            check_schema(record, kind, line.where)
        yield line


def intact_records(data: bytes) -> Iterator[tuple[Any, int]]:
    """The records of a JSONL file being appended to (a ``.partial`` file), each with the byte
    offset just past its line; stops at the first torn or unparsable line (a kill mid-write),
    which a resumed run truncates away."""
    end = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            return
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        end += len(raw)
        yield record, end


def dumps(record: Any) -> bytes:
    """One JSONL line (with newline). Non-string dict keys and numpy scalars are allowed."""
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike | None) -> Iterator[IO[bytes]]:
    """A binary stream that becomes ``path`` only if the block finishes without error.

    Writes to a temporary file in the same directory, fsyncs, then renames over ``path``, so
    an interrupted or failed run never leaves a truncated file or damages an existing one.
    ``None`` or ``-`` means stdout (written directly).
    """
    if path is None or str(path) == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_path(path: str | os.PathLike) -> Path:
    """An output file name that can be written: not a directory, in a directory that exists.
    Stages call it before long work, so a bad ``-o`` fails at once, not after hours."""
    target = Path(path)
    if target.is_dir():
        raise CartError(f"{target}: is a directory, expected an output file name")
    if not target.parent.exists():
        raise CartError(f"{target}: directory {target.parent} does not exist")
    return target


def write_jsonl(records: Iterable[Any], path: str | os.PathLike | None) -> int:
    """Write records as JSONL to ``path`` atomically (or stdout for ``-``/None). Returns the count.

    Records are produced lazily, so a failure midway leaves an existing file untouched.
    """
    n = 0
    with atomic_output(path) as f:
        for record in records:
            f.write(dumps(record))
            n += 1
    return n


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``: sizes for people (tables, listings)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str, name: str) -> int:
    """``"4GiB"`` / ``"512MB"`` / ``"1048576"`` -> bytes; ``name`` is the flag, for the error."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise CartError(f"{name} must be a size such as 1048576, 512MiB or 4GiB, got {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


class Console:
    """stderr diagnostics. stdout carries data only.

    Progress and info are shown only on a terminal and without ``--quiet``; warnings are shown
    unless ``--quiet`` (they say that data was skipped, which a log must keep); errors always.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.interactive = (not quiet) and sys.stderr.isatty()
        self._rich = None

    @property
    def rich(self):
        if self._rich is None:
            from rich.console import Console as RichConsole

            self._rich = RichConsole(stderr=True, highlight=False)
        return self._rich

    def info(self, message: str) -> None:
        if self.interactive:
            self.rich.print(message)

    def notice(self, message: str) -> None:
        """A line the user must see even in a log (e.g. where an output went), unless quiet."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if not self.quiet:
            print(f"cart: warning: {message}", file=sys.stderr, flush=True)

    def progress(self, **kwargs):
        """A rich Progress on stderr, or a do-nothing stand-in when not interactive."""
        if not self.interactive:
            return _NoProgress()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.rich,
            transient=False,
            **kwargs,
        )


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass
