"""Stage configs: typed dataclasses, a ``--config`` file (TOML or JSON) and command-line flags.

Precedence: flags given on the command line > the config file > the dataclass defaults. The
resolved config (``dataclasses.asdict``) is recorded with every output.

A config file holds either a table per stage (``[chunk]``, ``[synth]`` ...) or, for a file
meant for one stage, the keys at top level. Keys are the flag names with ``-`` or ``_``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from cart.io import CartError

T = TypeVar("T")


def load_config_file(path: str | Path | None, stage: str) -> dict[str, Any]:
    """The settings for ``stage`` from a TOML/JSON config file ({} when no file)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise CartError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise CartError(f"{p}: invalid config file ({e})") from None
    if not isinstance(data, dict):
        raise CartError(f"{p}: config file must hold a table of settings")
    section = data.get(stage, data)
    if not isinstance(section, dict):
        raise CartError(f"{p}: [{stage}] must be a table of settings")
    # Tables for other stages may live in the same file; skip them.
    return {k.replace("-", "_"): v for k, v in section.items() if not isinstance(v, dict)}


def resolve(cls: type[T], config_file: str | Path | None, stage: str, **flags: Any) -> T:
    """Build ``cls`` from defaults, then the config file, then the flags that were given.

    A flag whose value is None was not given. Unknown keys in the file are errors that name
    the key; value errors come from the dataclass's ``__post_init__``.
    """
    values = load_config_file(config_file, stage)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise CartError(
            f"{config_file}: unknown setting '{unknown[0]}' for {stage} "
            f"(known: {', '.join(sorted(known))})"
        )
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**values)
    except TypeError as e:  # a wrongly typed value from a config file
        raise CartError(f"{config_file or 'config'}: {e}") from None


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    """For ``__post_init__``: config files can carry any JSON type."""
    types_t = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types_t:
        ok = False
    else:
        ok = isinstance(value, types_t)
    if not ok:
        names = " or ".join(t.__name__ for t in types_t)
        raise CartError(f"{flag(name)} must be {names}, got {value!r}")


def flag(name: str) -> str:
    """The command-line spelling of a config field, for messages."""
    return "--" + name.replace("_", "-")
