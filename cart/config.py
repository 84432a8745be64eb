"""Stage configs: typed dataclasses, a ``--config`` file (TOML or JSON) and command-line flags.

Precedence: flags given on the command line > the config file > the dataclass defaults. The
resolved config (``dataclasses.asdict``) is recorded with every output.

A config file holds either a table per stage (``[chunk]``, ``[synth]`` ...) or, for a file
meant for one stage, the keys at top level. Keys are the flag names with ``-`` or ``_``.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    for key, value in values.items():
        check_finite(f"{config_file}: setting '{key}'", value)
    flags = {k: v for k, v in flags.items() if v is not None}
    for key, value in flags.items():
        check_finite(flag(key), value)
    values.update(flags)
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
    check_finite(flag(name), value)


def check_finite(name: str, value: Any) -> None:
    """Refuse NaN and infinities, which flags (click's FLOAT) and config files (TOML ``nan``,
    JSON ``Infinity``) both let through, and which slip past range checks (``nan < 0`` is
    False) to poison sampling or training. ``name`` is the flag or setting, for the message."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CartError(f"{name} must be a finite number, got {value}")
    if isinstance(value, list):
        for item in value:
            check_finite(name, item)


# Counts past these are typos, not runs: they would sit silently for hours or exhaust memory
# before the first progress update.
MAX_COUNT = 1_000_000
MAX_BATCH = 4096


def check_at_most(name: str, value: int, maximum: int) -> None:
    """For ``__post_init__``: a one-line error for an absurdly large count or batch."""
    if value > maximum:
        raise CartError(f"{name} must be at most {maximum}, got {value}")


def flag(name: str) -> str:
    """The command-line spelling of a config field, for messages."""
    return "--" + name.replace("_", "-")
