"""``cart info``: what a cartridge file holds, how big it is, and what it saves.

The compression ratio compares the cartridge's KV cache with the KV cache the whole corpus
would occupy in context for the same model and dtype (``corpus_tokens`` x bytes per token),
byte for byte: a flat (ragged) cartridge's memory is exactly the keys and values it keeps.
"""

from __future__ import annotations

import os
from typing import Any

from cart.cartridge import Cartridge, kv_bytes_per_token
from cart.io import human_bytes


def cartridge_info(path: str | os.PathLike, model: str | None = None) -> dict[str, Any]:
    """Metadata plus sizes, as a JSON-ready dict. With ``model``, checks compatibility.
    ``path`` may be ``-`` (stdin) or a PEFT adapter folder."""
    from cart.io import Console, display_name

    expect = None
    if model is not None:
        from cart.models import ModelIdentity, resolve_model

        expect = ModelIdentity.of(resolve_model(model, Console(quiet=True)))
    cart = Cartridge.load(path, expect, display_name(path))
    md = cart.metadata
    per_token = kv_bytes_per_token(cart.num_layers, cart.kv_heads, cart.head_dim, cart.dtype)
    info: dict[str, Any] = {
        "file": display_name(path),
        "file_bytes": _adapter_bytes(path) if _is_folder(path) else cart.file_bytes,
        "kv_bytes": cart.kv_bytes(),
        "kv_bytes_per_token": per_token,
    }
    corpus_tokens = md.get("corpus_tokens")
    if corpus_tokens:
        info["corpus_kv_bytes"] = corpus_tokens * per_token
        # from the bytes: a flat cartridge's num_tokens is an average
        info["compression_ratio"] = round(info["corpus_kv_bytes"] / info["kv_bytes"], 2)
    if expect is not None:
        info["compatible_with"] = expect.model_id
    if (md.get("init") or {}).get("kind") == "peft":  # what PEFT does not record stays unknown
        info["unknown"] = [k for k in UNKNOWN_IN_PEFT if k not in md]
    info["metadata"] = md
    return info


# what a cartridge PEFT made cannot tell (it records the KV and the base model only)
UNKNOWN_IN_PEFT = ("corpus_hash", "corpus_tokens", "corpus_paths", "synth", "training", "steps",
                   "tokens", "loss")


def _is_folder(path: str | os.PathLike) -> bool:
    return str(path) != "-" and os.path.isdir(path)


def _adapter_bytes(path: str | os.PathLike) -> int:
    """The bytes of a PEFT adapter folder's files."""
    from cart.peft_adapter import CONFIG_FILE, WEIGHTS_FILE

    return sum(os.path.getsize(os.path.join(path, f)) for f in (CONFIG_FILE, WEIGHTS_FILE))


def format_info(info: dict[str, Any]) -> str:
    """A plain two-column listing (stable, greppable)."""
    md = info["metadata"]
    rows: list[tuple[str, str]] = [
        ("file", info["file"]),
        ("file size", f"{info['file_bytes']} bytes ({human_bytes(info['file_bytes'])})"),
        ("KV cache", f"{info['kv_bytes']} bytes ({human_bytes(info['kv_bytes'])}) for "
                     + (f"{md['p']} tokens per KV head and layer on average (flat; a sink per head)"
                        if md["format"].endswith("/3") else
                        f"{md['p']} tokens ({md['num_frozen_tokens']} frozen)")),
    ]
    if "corpus_kv_bytes" in info:
        rows.append(("corpus in context",
                     f"{info['corpus_kv_bytes']} bytes ({human_bytes(info['corpus_kv_bytes'])}) "
                     f"for {md['corpus_tokens']} tokens"))
        rows.append(("compression", f"{info['compression_ratio']}x smaller than the corpus's KV cache"))
    if "compatible_with" in info:
        rows.append(("compatible with", info["compatible_with"]))
    for key in info.get("unknown", ()):
        rows.append((key, "unknown (not recorded in the PEFT adapter)"))
    for key in sorted(md):
        value = md[key]
        if isinstance(value, (dict, list)):
            import json

            value = json.dumps(value, sort_keys=True)
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"
