"""The cartridge store of ``cart serve``: the cartridges of one directory, by name.

A cartridge's name is its file name without ``.safetensors``, or the name of a PEFT CARTRIDGE
adapter folder in the directory (converted on load, as every stage reads one; its files must
lie inside the directory too). Names come from requests, so a
name must match a pattern with no separators (and no leading dot) before it is joined to the
directory, and the file it names must resolve to a regular file directly inside the directory:
no ``..``, no symlink leaving it. A symlink to a file of the directory is served under its
own name too (an alias); one leading out of it, or to nothing, is rejected with a warning. A
request's lookup costs one stat, not a directory listing. Files are loaded on first use and kept
in memory, least recently used first, within a bound on their total bytes; a file that changed
on disk (size or mtime) is reloaded, new files are seen on the next listing, and deleted ones
leave the listing and the memory then -- no restart. A corrupt file (a crafted header
included), or one trained for another model, is rejected with a logged reason and never takes
the server down.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cart.io import CartError
from cart.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, is_adapter_dir

log = logging.getLogger("cart.serve")

SUFFIX = ".safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class UnknownCartridge(LookupError):
    """No usable cartridge of that name (a 404 for the server)."""


@dataclass
class Entry:
    name: str
    cartridge: Any  # cart.cartridge.Cartridge
    nbytes: int
    stamp: tuple[int, int]  # (size, mtime_ns) of the file it came from
    sha256: str
    kv_prefix: Any = None  # the engine's view of it, made on first use by the server


class CartridgeStore:
    def __init__(self, directory: str | os.PathLike, identity: Any = None,
                 max_bytes: int = 8 << 30):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CartError(f"{self.directory}: not a directory of cartridges")
        self._root = self.directory.resolve()
        self.identity = identity  # cart.models.ModelIdentity: cartridges must fit it
        self.max_bytes = max_bytes
        self._loaded: OrderedDict[str, Entry] = OrderedDict()
        self._rejected: dict[str, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()

    # -- what is there ---------------------------------------------------------------------
    def _file(self, name: Any) -> Path | None:
        """The file holding cartridge ``name``: a regular file directly inside the directory
        (the name pattern has no separators; a symlink out of the directory does not count),
        or else a PEFT adapter folder of that name directly inside it."""
        if not isinstance(name, str) or not _NAME.match(name):
            return None
        for path, usable in ((self.directory / (name + SUFFIX), Path.is_file),
                             (self.directory / name, is_adapter_dir)):
            try:
                real = path.resolve(strict=True)
            except OSError:
                continue
            if real.parent == self._root and usable(real):
                return path
        return None

    def _stamp(self, path: Path) -> tuple[int, int]:
        """(size, mtime_ns) of a cartridge file, or summed and latest over an adapter folder's
        files (which must lie inside the directory). OSError if it is gone."""
        if not path.is_dir():
            st = path.stat()
            return st.st_size, st.st_mtime_ns
        size = mtime = 0
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            part = path / name
            if part.exists() and not part.resolve().is_relative_to(self._root):
                raise PermissionError(f"{path.name}/{name} leads out of the cartridge directory")
            st = part.stat() if part.exists() else None
            if st is not None:
                size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
        return size, mtime

    def entries(self) -> list[Entry]:
        """The usable cartridges now, by name (loading or checking the new and changed ones)."""
        out = []
        names = {p.name[: -len(SUFFIX)] if p.name.endswith(SUFFIX) else p.name
                 for p in self.directory.iterdir()
                 if p.name.endswith(SUFFIX) or is_adapter_dir(p)}
        for name in sorted(names):
            try:
                out.append(self.entry(name))
            except UnknownCartridge:
                continue
        with self._lock:  # and what was deleted since it was loaded leaves memory
            for name in set(self._loaded) - {e.name for e in out}:
                del self._loaded[name]
        return out

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    # -- lookup ----------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        """The store's entry for ``name`` (cartridge, bytes, file stamp, sha256); UnknownCartridge
        if there is none usable."""
        from cart.cartridge import Cartridge

        path = self._file(name)
        try:
            stamp = self._stamp(path) if path is not None else None
        except PermissionError as e:  # an adapter folder's file linked out of the directory
            self._reject(name, (0, 0), f"{e.args[0]} (links out of it are not served)")
        except OSError:  # removed since
            stamp = None
        if stamp is None:
            with self._lock:
                self._loaded.pop(name, None)
            self._refuse_link(name)
            raise UnknownCartridge(f"no cartridge named {name!r}")
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and entry.stamp == stamp:
                self._loaded.move_to_end(name)
                return entry
            bad = self._rejected.get(name)
            if bad is not None and bad[0] == stamp:
                raise UnknownCartridge(f"cartridge {name!r} is unusable: {bad[1]}")
        try:
            try:
                cart = Cartridge.load(path, self.identity, path.name, shown=path.name)
            except OSError as e:
                raise CartError(f"cannot read it ({e.strerror})") from None
        except CartError as e:
            self._reject(name, stamp, str(e))
        except Exception as e:  # a file crafted past the format checks: still only that file
            self._reject(name, stamp, f"cannot be read as a cartridge ({type(e).__name__}: {e})")
        nbytes = cart.kv_bytes()
        entry = Entry(name, cart, nbytes, stamp, cart.file_sha256)
        with self._lock:
            self._rejected.pop(name, None)
            self._loaded[name] = entry
            self._loaded.move_to_end(name)
            while len(self._loaded) > 1 and self._bytes() > self.max_bytes:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("evicted cartridge %s from memory (LRU)", evicted)
        log.info("loaded cartridge %s (%d tokens, %d bytes)", name, cart.num_tokens, nbytes)
        return entry

    def _reject(self, name: str, stamp: tuple[int, int], reason: str):
        """Remember (until the file changes), log once and raise why ``name`` is not served."""
        with self._lock:
            self._loaded.pop(name, None)
            known = self._rejected.get(name)
            self._rejected[name] = (stamp, reason)
        if known != (stamp, reason):
            log.warning("rejected cartridge %s: %s", name, reason)
        raise UnknownCartridge(f"cartridge {name!r} is unusable: {reason}") from None

    def _refuse_link(self, name: Any) -> None:
        """If ``name`` is a symlink that leads out of the directory (or to nothing), reject it
        with a reason; a plain missing name just is not there."""
        if not isinstance(name, str) or not _NAME.match(name):
            return
        for candidate in (self.directory / (name + SUFFIX), self.directory / name):
            try:
                st = candidate.lstat()
            except OSError:
                continue
            break
        else:
            return
        if stat.S_ISLNK(st.st_mode):
            self._reject(name, (st.st_size, st.st_mtime_ns), "a symbolic link that does not lead "
                         "to a file in the cartridge directory (links out of it are not served)")

    def _prune(self) -> None:
        """Drop from memory the cartridges whose file is gone or changed since they were
        loaded (so /health does not show a deleted one until a request names it)."""
        with self._lock:
            loaded = list(self._loaded.items())
        for name, entry in loaded:
            path = self._file(name)
            try:
                stamp = self._stamp(path) if path is not None else None
            except OSError:
                stamp = None
            if stamp != entry.stamp:
                with self._lock:
                    if self._loaded.get(name) is entry:
                        del self._loaded[name]

    def loaded_bytes(self) -> int:
        self._prune()
        return self._bytes()

    def _bytes(self) -> int:
        return sum(e.nbytes for e in self._loaded.values())

    def loaded_names(self) -> list[str]:
        self._prune()
        with self._lock:
            return list(self._loaded)
