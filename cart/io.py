"""Shared file plumbing for every stage: JSONL in/out, ``-`` for stdin/stdout, record schemas,
atomic writes, and the stderr console.

This module imports nothing of ``cart`` (every stage and the core build on it), and nothing
heavy, so that ``cart --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
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


def read_input_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The whole of an input (stdin for ``-``), with one-line errors that call it a ``what``
    (``"cartridge file"``)."""
    if str(path) == STDIO:
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.exists():
        raise CartError(f"{path}: no such {what}")
    if p.is_dir():
        raise CartError(f"{path}: is a directory, expected a {what}")
    try:
        return p.read_bytes()
    except OSError as e:
        raise CartError(f"{path}: cannot read: {e.strerror}") from None


def check_stdin_once(inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse ``-`` given twice: stdin can be read only once."""
    if sum(str(i) == STDIO for i in inputs) > 1:
        raise CartError("- (stdin) is given more than once; it can be read only once")


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
    offset just past its line; stops at the first torn or unparsable line (a kill mid-write)
    or line that is not a JSON object (not written by cart), which a resumed run truncates away."""
    end = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            return
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(record, dict):
            return
        end += len(raw)
        yield record, end


def run_fingerprint(settings: dict[str, Any], *inputs: Any) -> str:
    """16 hex digits naming a run: the SHA-256 of a stage's ``settings`` (its config as a dict)
    and ``inputs`` (JSON values: digests or ids of its data, the model's hashes).

    Runs of one fingerprint write the same records (up to numerics), so either may resume the
    other's output.
    The rule: a stage leaves out of ``settings`` only what cannot change its records (output
    paths and verbosity, which no config holds; the runtime -- ``engine`` and ``device``, left
    out here, so that a run resumes and its shards run anywhere; distill's ``--save-every``) or
    what a resumed run may change on purpose (distill's ``--steps``/``--epochs``: a longer run
    continues a shorter one)."""
    kept = {k: v for k, v in settings.items() if k not in ("engine", "device")}
    return sha256_hex(dumps([kept, *inputs]).decode())[:16]


class PartialOutput:
    """``-o FILE`` built as ``FILE.partial``, which a rerun of the same run resumes after a kill
    (even ``kill -9``). The one ``.partial`` format: a line ``{"run": FINGERPRINT}``
    (``run_fingerprint``), then one JSON object a line, each synced to disk as it is written.
    ``earlier``: the records an earlier try left (up to a torn or foreign line), each with the
    byte offset past it; the stage keeps a prefix and ``resume``s after it. A partial file of
    another fingerprint is refused in the stage's words ``another_run`` (what it holds)."""

    def __init__(self, output: str | os.PathLike, run: str, another_run: str):
        self.output, self.run = Path(output), run
        self.path = self.output.with_name(self.output.name + ".partial")
        lines = list(intact_records(self.path.read_bytes())) if self.path.exists() else []
        if lines and lines[0][0].get("run") != run:
            raise CartError(f"{self.path}: {another_run}; delete it to start over")
        self.earlier: list[tuple[dict, int]] = lines[1:]

    def resume(self, end: int) -> None:
        """Drop what follows byte ``end`` of the earlier records (0: all, the first line too)."""
        with open(self.path, "r+b" if end else "wb") as f:
            f.truncate(end)
        if not end:
            self.append([{"run": self.run}])

    def append(self, records: Iterable[Any]) -> None:
        with open(self.path, "ab") as f:
            f.write(b"".join(dumps(r) for r in records))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, records: Iterable[Any] | None = None) -> None:
        """Write FILE atomically (``records``, or else the partial file's own); delete the partial."""
        import shutil

        with atomic_output(self.output) as out, open(self.path, "rb") as f:
            if records is None:
                f.readline()  # the fingerprint
                shutil.copyfileobj(f, out)
            else:
                out.writelines(dumps(r) for r in records)
        self.path.unlink()


def dumps(record: Any) -> bytes:
    """One JSONL line (with newline). Non-string dict keys and numpy scalars are allowed."""
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike | None) -> Iterator[IO[bytes]]:
    """A binary stream that becomes ``path`` only if the block finishes without error.

    Writes to a temporary file in the same directory, fsyncs, then renames over ``path``, so
    an interrupted or failed run never leaves a truncated file or damages an existing one.
    ``None`` or ``-`` means stdout (written directly). A symlink is followed: its target is
    replaced and the link kept. A FIFO, a device, ``/dev/stdout`` or a process substitution
    (``-o >(gzip > x.gz)``) is written straight into: a rename would replace it by a file.
    """
    if path is None or str(path) == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target, atomic = output_destination(path)
    if not atomic:
        with _write_errors(path):
            with _open_for_writing(target) as f:
                yield f
        return
    fd, tmp = _temp_beside(target, path)
    try:
        os.fchmod(fd, _mode_for(target))
        with _write_errors(path):
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# A full disk or quota while writing an output is the environment, not a bug.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


@contextlib.contextmanager
def _write_errors(path: str | os.PathLike) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise CartError(f"{path}: cannot write: {e.strerror}") from None


def _open_for_writing(target: Path) -> IO[bytes]:
    try:
        return open(target, "wb")
    except OSError as e:
        raise CartError(f"{target}: cannot open for writing: {e.strerror}") from None


def output_destination(path: str | os.PathLike) -> tuple[Path, bool]:
    """Where output ``path`` is written, and whether atomically (temp file + rename).

    A regular file or a new name is replaced by a rename, through symlinks to their final
    target (as other Unix tools write through a link). Anything else -- a FIFO, a character
    device, ``/dev/stdout`` or ``/dev/fd/N`` of a process substitution -- is a stream that
    is written in place: renaming over it would swap the device or pipe for a plain file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:  # a loop of links, a file used as a directory, no permission
        raise CartError(f"{path}: cannot write: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CartError(f"{path}: is a directory, expected an output file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        return Path(path), False
    if st is not None and _OPEN_FILE_NAME.fullmatch(os.path.abspath(path)):
        return Path(path), False
    # Only a link as the last component would itself be replaced; linked directories are fine.
    return Path(os.path.realpath(path) if os.path.islink(path) else path), True


# ``/dev/stdout`` or ``/proc/self/fd/1`` redirected to a file: the shell opened that file for
# this run, so it is written through the descriptor, not renamed over.
_OPEN_FILE_NAME = re.compile(r"/dev/(stdout|stderr|fd/\d+)|/proc/(self|thread-self|\d+)/fd/\d+")


def check_output_path(path: str | os.PathLike) -> Path:
    """An output file name that can be written: not a directory, in a directory that exists
    and takes new files. Stages call it before long work (loading a model, training), so a
    bad ``-o`` fails at once, not after hours. Returns the path as given."""
    target, atomic = output_destination(path)
    if not atomic:
        if not os.access(target, os.W_OK):
            raise CartError(f"{path}: cannot open for writing: Permission denied")
        return Path(path)
    fd, probe = _temp_beside(target, path)  # the only sure test (read-only mounts, root ...)
    os.close(fd)
    os.unlink(probe)
    return Path(path)


def _temp_beside(target: Path, path: str | os.PathLike) -> tuple[int, str]:
    """A new temporary file in ``target``'s directory (same filesystem, so it can be renamed
    over ``target``), or a one-line error saying why the directory takes no files."""
    if not target.parent.is_dir():
        raise CartError(f"{path}: directory {target.parent} does not exist")
    try:
        return tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise CartError(f"{path}: cannot write in directory {target.parent}: {e.strerror}") from None


def _mode_for(target: Path) -> int:
    """The permissions a replaced file keeps, or a new file's (0666 less the umask), not the
    temporary file's 0600."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: Sequence[str | os.PathLike | None]) -> None:
    """Before any work: every output can be written (``check_output_path``), none of them is
    one of the inputs -- the same file by resolved path or inode, or an existing file inside
    an input directory, which the stage would read -- and no two outputs are the same file.

    ``outputs`` maps each flag (``-o``, ``--log`` ...) to its path; None and ``-`` are skipped.
    """
    seen: list[tuple[str, str]] = []
    for flag, out in outputs.items():
        if out is None or str(out) == STDIO:
            continue
        check_output_path(out)
        for inp in inputs:
            if inp is None or str(inp) == STDIO or not os.path.exists(inp):
                continue  # a missing input is the stage's own error, not a clash
            if _same_file(out, inp):
                raise CartError(f"{flag} {out}: is the input {inp}; choose another output file")
            if _inside_walked_directory(out, inp):
                raise CartError(f"{flag} {out}: is a file in the input directory {inp}, which "
                                "would be read as input; choose another output file")
        for other_flag, other in seen:
            if _same_file(out, other):
                raise CartError(f"{flag} {out}: is also {other_flag} {other}; choose another "
                                "output file")
        seen.append((flag, str(out)))


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two names reach the same file: through links (resolved paths) or hard links
    (inodes)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def _inside_walked_directory(out: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether ``out`` is an existing file that a corpus walk of ``directory`` reads (hidden
    names are skipped by the walk)."""
    if not (os.path.isdir(directory) and os.path.isfile(out)):
        return False
    root, real = os.path.realpath(directory), os.path.realpath(out)
    rel = os.path.relpath(real, root)
    if rel.startswith(os.pardir + os.sep) or rel == os.pardir:
        return False
    return not any(part.startswith(".") for part in Path(rel).parts)


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


def check_output_dir(path: str | os.PathLike) -> Path:
    """An output folder name that can be written: not an existing file, in a directory that
    exists and takes new entries (probed, as ``check_output_path`` does for files)."""
    if str(path) == STDIO:
        raise CartError("-o -: this output is a folder, which cannot go to stdout; give -o DIR")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CartError(f"{path}: is a file, expected an output folder name")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise CartError(f"{path}: directory {parent} does not exist")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise CartError(f"{path}: cannot write in directory {parent}: {e.strerror}") from None
    return target


def write_folder(path: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) as the folder ``path``, atomically: they are built in a
    temporary folder beside it, fsynced, and renamed into place only when complete. An existing
    folder at ``path`` is replaced only then (renamed aside, the new one renamed in, the old
    one removed; put back if the rename fails), so a failed run leaves it untouched."""
    import shutil

    target = check_output_dir(path).absolute()
    parent = target.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        with _write_errors(path):
            os.chmod(tmp, 0o777 & ~_umask())
            for name, data in files.items():
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            if target.is_dir():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
                os.replace(target, old)  # onto the empty folder just made: an atomic swap-out
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old, target)
                    old = None
                    raise
            else:
                os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
