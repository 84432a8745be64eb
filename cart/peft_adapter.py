"""PEFT CARTRIDGE adapter folders <-> cart cartridges, read and written without importing peft.

Hugging Face PEFT (>= 0.19) stores a cartridge as a folder (see ``cart-formats(5)``):

* ``adapter_config.json`` -- ``peft_type`` ``"CARTRIDGE"``, ``num_virtual_tokens`` (p),
  ``num_frozen_tokens``, ``num_layers``, ``num_attention_heads`` (the KV heads: PEFT sets it to
  ``num_key_value_heads`` for grouped-query attention), ``token_dim`` (KV heads x head dim),
  ``num_transformer_submodules`` (1 for a decoder) and ``base_model_name_or_path``;
* ``adapter_model.safetensors`` -- one tensor, ``prompt_embeddings``, shape
  ``[p, num_layers * 2 * token_dim]``: row t is virtual token t, laid out as
  ``[layer][key, value][kv head][head dim]``. The first ``num_frozen_tokens`` rows are the
  frozen sink. Keys are post-RoPE at positions 0..p-1, and PEFT puts the tokens after the
  prefix at positions p, p+1, ... -- cart's own convention, so an adapter's cartridge has
  ``query_position`` p.

A cartridge cart exports carries its whole cart metadata in the safetensors header (key
``cart.metadata``, beside PEFT's ``format: pt``), so converting back restores it and the
tensors bit for bit. An adapter PEFT made has no cart metadata: its model identity comes from
the model in use or from the base model its config names (found locally), and what PEFT does
not record (corpus, synth and training settings) stays absent, shown as unknown.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cart.io import CartError

if TYPE_CHECKING:
    from cart.cartridge import Cartridge
    from cart.models import ModelIdentity

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
TENSOR = "prompt_embeddings"
PEFT_TYPE = "CARTRIDGE"
METADATA_KEY = "cart.metadata"  # cart's metadata (JSON), in the weights' safetensors header


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter config (any PEFT type)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


# -- reading ---------------------------------------------------------------------------------
def read_config(path: str | os.PathLike, shown: str | None = None) -> dict[str, Any]:
    """The adapter config of a PEFT CARTRIDGE adapter folder, checked: a LoRA (or any other)
    adapter, a config of another task, or fields that are not counts are refused. ``shown``:
    how messages name the folder (default: ``path``)."""
    shown = shown or str(path)
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CartError(f"{shown}: is a directory, not a cartridge file or a PEFT adapter folder "
                        f"(no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_bytes())
    except OSError as e:
        raise CartError(f"{shown}/{CONFIG_FILE}: cannot read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CartError(f"{shown}/{CONFIG_FILE}: not valid JSON") from None
    if not isinstance(config, dict):
        raise CartError(f"{shown}/{CONFIG_FILE}: not a PEFT adapter config (not a JSON object)")
    kind = config.get("peft_type")
    if kind != PEFT_TYPE:
        raise CartError(f"{shown}: a PEFT {kind or 'unknown-type'} adapter, not a cartridge "
                        f"(cart reads PEFT adapters of peft_type {PEFT_TYPE})")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CartError(f"{shown}: a PEFT cartridge for task {config['task_type']}, not CAUSAL_LM")
    if config.get("num_transformer_submodules", 1) != 1:
        raise CartError(f"{shown}: a PEFT cartridge for an encoder-decoder model "
                        f"(num_transformer_submodules={config['num_transformer_submodules']}); "
                        "cart serves decoder-only models")
    config.setdefault("num_frozen_tokens", 1)  # CartridgeConfig's default
    for key in ("num_virtual_tokens", "num_frozen_tokens", "num_layers", "num_attention_heads",
                "token_dim"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CartError(f"{shown}/{CONFIG_FILE}: field '{key}' must be a non-negative integer, got "
                            f"{value!r}")
    p, heads = config["num_virtual_tokens"], config["num_attention_heads"]
    if p < 1 or config["num_layers"] < 1 or heads < 1 or config["token_dim"] < 1:
        raise CartError(f"{shown}/{CONFIG_FILE}: num_virtual_tokens, num_layers, num_attention_heads and "
                        "token_dim must be positive")
    if config["num_frozen_tokens"] > p:
        raise CartError(f"{shown}/{CONFIG_FILE}: num_frozen_tokens {config['num_frozen_tokens']} exceeds "
                        f"num_virtual_tokens {p}")
    if config["token_dim"] % heads:
        raise CartError(f"{shown}/{CONFIG_FILE}: token_dim {config['token_dim']} is not a multiple of "
                        f"num_attention_heads {heads}")
    return config


def read_adapter(path: str | os.PathLike, expect: ModelIdentity | None = None,
                 declared: bool = False, shown: str | None = None) -> Cartridge:
    """The cartridge a PEFT CARTRIDGE adapter folder holds.

    ``expect``: the model it is for (the model in use); an adapter PEFT made for another base
    model is refused. ``declared``: ``expect`` was named by the user for this adapter (``cart
    convert --model``), so a base model name that cannot be found locally is taken on trust.
    Without ``expect``, an adapter PEFT made is checked against the base model its config
    names, which must be found locally. ``shown``: how messages name the folder (default:
    ``path``)."""
    from cart.cartridge import Cartridge, _one_line, decode_metadata, safetensors_header
    from cart.io import read_input_bytes

    shown = shown or str(path)
    config = read_config(path, shown)
    folder = Path(path)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        if (folder / PICKLE_WEIGHTS_FILE).is_file():
            raise CartError(f"{shown}: holds {PICKLE_WEIGHTS_FILE} (a pickle, which cart never "
                            f"loads), not {WEIGHTS_FILE}: re-save it with PEFT's "
                            "save_pretrained(..., safe_serialization=True)")
        raise CartError(f"{shown}: PEFT adapter folder without {WEIGHTS_FILE}")
    data = read_input_bytes(weights_path, "adapter weights file")
    header = safetensors_header(data, f"{shown}/{WEIGHTS_FILE}")
    names = sorted(k for k in header if k != "__metadata__")
    if names != [TENSOR]:
        raise CartError(f"{shown}/{WEIGHTS_FILE}: expected the one tensor '{TENSOR}' of a PEFT cartridge, "
                        f"found {', '.join(map(repr, names)) or 'none'}")
    p, frozen, layers = (config[k] for k in ("num_virtual_tokens", "num_frozen_tokens",
                                             "num_layers"))
    heads, token_dim = config["num_attention_heads"], config["token_dim"]
    head_dim = token_dim // heads
    want = [p, layers * 2 * token_dim]
    if header[TENSOR]["shape"] != want:
        raise CartError(f"{shown}: {TENSOR} has shape {header[TENSOR]['shape']}, but "
                        f"{CONFIG_FILE} says {want} (num_virtual_tokens {p}, num_layers {layers} "
                        f"x 2 x token_dim {token_dim})")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        flat = load(data)[TENSOR]
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CartError(f"{shown}/{WEIGHTS_FILE}: corrupt safetensors file ({_one_line(e)})") from None
    # [p, layer, key/value, kv head, head dim] -> per layer [kv heads, p, head dim]
    kv = flat.view(p, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)
    keys = [kv[i, 0].contiguous() for i in range(layers)]
    values = [kv[i, 1].contiguous() for i in range(layers)]

    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is not None:  # exported by cart: its metadata comes back whole
        try:
            stored = json.loads(raw)
        except (ValueError, RecursionError):
            stored = None
        if not (isinstance(stored, dict) and all(isinstance(v, str) for v in stored.values())):
            raise CartError(f"{shown}/{WEIGHTS_FILE}: corrupt {METADATA_KEY} in the safetensors metadata")
        metadata = decode_metadata(stored, shown)
    else:
        metadata = _peft_metadata(config, path, shown, weights_path, expect, declared)
    try:
        cart = Cartridge(frozen_keys=[k[:, :frozen] for k in keys],
                         frozen_values=[v[:, :frozen] for v in values],
                         keys=[k[:, frozen:] for k in keys], values=[v[:, frozen:] for v in values],
                         metadata=metadata)
    except ValueError as e:
        raise CartError(f"{shown}: corrupt PEFT cartridge ({e})") from None
    if raw is not None:
        _check_exported(cart, stored, shown)
    return cart


def _check_exported(cart: Cartridge, stored: dict[str, str], shown: str) -> None:
    """An adapter cart exported must still hold what its cart metadata describes: same shape,
    and tensor data with the checksum cart recorded (not edited since)."""
    from cart.cartridge import CHECKSUM_KEY, data_section_sha256

    md = cart.metadata
    shape = (cart.num_tokens, cart.num_frozen, cart.num_layers, cart.kv_heads, cart.head_dim)
    if shape != tuple(md.get(k) for k in ("p", "num_frozen_tokens", "num_layers", "kv_heads",
                                           "head_dim")):
        raise CartError(f"{shown}: the cart metadata in {WEIGHTS_FILE} does not match its "
                        f"tensors (edited since cart wrote it?)")
    from safetensors.torch import save

    checksum = stored.get(CHECKSUM_KEY)  # of the data section, which the metadata does not change
    if checksum is not None and checksum != data_section_sha256(save(cart.tensors())):
        raise CartError(f"{shown}: the tensors in {WEIGHTS_FILE} do not match the checksum in its "
                        "cart metadata (edited since cart wrote it?)")


def _peft_metadata(config: dict[str, Any], path: str | os.PathLike, shown: str,
                   weights_path: Path, expect: ModelIdentity | None,
                   declared: bool) -> dict[str, Any]:
    """Metadata of an adapter PEFT made: the model identity (checked), where it came from,
    and nothing PEFT did not record."""
    identity, how = _identity(config, shown, expect, declared)
    shape = (config["num_layers"], config["num_attention_heads"],
             config["token_dim"] // config["num_attention_heads"])
    if shape != (identity.num_layers, identity.kv_heads, identity.head_dim):
        raise CartError(f"{shown}: KV shape (layers, kv heads, head dim) {shape} does not match "
                        f"{identity.model_id}'s "
                        f"{(identity.num_layers, identity.kv_heads, identity.head_dim)}")
    mtime = _dt.datetime.fromtimestamp(weights_path.stat().st_mtime, _dt.UTC)
    init = {"kind": "peft", "adapter": Path(os.path.abspath(path)).name, "identity": how,
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "peft_version": config.get("peft_version")}
    return {"base_model": identity.model_id, "model_config_hash": identity.config_hash,
            "tokenizer_hash": identity.tokenizer_hash,
            "init": {k: v for k, v in init.items() if v is not None},
            "created": mtime.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _identity(config: dict[str, Any], shown: str, expect: ModelIdentity | None,
              declared: bool) -> tuple[ModelIdentity, str]:
    """The model an adapter PEFT made is for, and how that was established."""
    name = config.get("base_model_name_or_path")
    if expect is None:
        if not name:
            raise CartError(f"{shown}: the PEFT adapter names no base model "
                            "(base_model_name_or_path): give --model")
        found = _local_identity(name)
        if found is None:
            raise CartError(f"{shown}: the PEFT adapter's base model {name} is not found locally: "
                            f"give --model (e.g. cart convert {shown} --model MODEL -o FILE)")
        return found, "base_model_name_or_path"
    if not name or name == expect.model_id:
        return expect, "model in use"
    found = _local_identity(name)
    if found is not None:
        if (found.config_hash, found.tokenizer_hash) == (expect.config_hash, expect.tokenizer_hash):
            return expect, "base_model_name_or_path"
        raise CartError(f"{shown}: a PEFT adapter for base model {name}, not {expect.model_id}")
    if declared:
        return expect, "--model"
    raise CartError(f"{shown}: a PEFT adapter for base model {name} (not found locally), not "
                    f"{expect.model_id}; if it is that model, convert it with "
                    f"cart convert {shown} --model MODEL -o FILE")


def _local_identity(name: str) -> ModelIdentity | None:
    """The identity of a model found locally by ``name`` (a folder, a .gguf file, a cached
    hub id), or None."""
    from cart.models import ModelIdentity, resolve_model

    try:
        return ModelIdentity.of(resolve_model(name))
    except CartError:
        return None


# -- writing ---------------------------------------------------------------------------------
def check_exportable(cart: Cartridge, name: str = "cartridge") -> None:
    """Refuse, in one line, a cartridge PEFT cannot reproduce: per-key attention biases, NaN.
    (Queries that start elsewhere than right after it, as in composed or compacted cartridges,
    are moved there by ``adapter_files``.)"""
    from cart.cartridge import _non_finite

    if cart.biases is not None:
        raise CartError(f"{name}: carries per-key attention biases ({cart.format}), which a PEFT "
                        "cartridge cannot hold: not converted")
    bad = _non_finite(cart.tensors())
    if bad is not None:
        raise CartError(f"{name}: not converted: tensor {bad} holds NaN or infinite values")


def adapter_files(cart: Cartridge, base_model_name_or_path: str | None,
                  name: str = "cartridge", config: Any = None) -> dict[str, bytes]:
    """The files of the PEFT CARTRIDGE adapter holding ``cart`` (name -> bytes). PEFT starts
    the queries right after the cartridge, at p: a cartridge whose queries start elsewhere
    (composed or compacted) has every key moved there first (``kvcache.at_query_position``,
    which needs the model's ``config``), the same attention up to float rounding. Refused, with
    one line, for what PEFT cannot reproduce: per-key attention biases."""
    import torch
    from safetensors.torch import save

    from cart.cartridge import safetensors_header
    from cart.kvcache import at_query_position

    check_exportable(cart, name)
    if cart.query_position != cart.num_tokens:
        if config is None:
            raise CartError(f"{name}: its queries start at position {cart.query_position}, not "
                            f"right after it at {cart.num_tokens} as in PEFT, and moving its keys "
                            "needs the model: give --model")
        cart = at_query_position(cart, config, cart.num_tokens)
    # per layer [kv heads, p, d] -> [p, layer, key/value, kv heads, d] -> [p, layers*2*heads*d]
    layers = [torch.stack(cart.layer(i)) for i in range(cart.num_layers)]
    flat = torch.stack(layers).permute(3, 0, 1, 2, 4).reshape(cart.num_tokens, -1).contiguous()
    # the metadata exactly as the cartridge file holds it (its tensor checksum included)
    stored = safetensors_header(cart.to_bytes(), name).get("__metadata__") or {}
    weights = save({TENSOR: flat}, metadata={"format": "pt",
                                             METADATA_KEY: json.dumps(stored, sort_keys=True)})
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": cart.kv_heads,
        "num_frozen_tokens": cart.num_frozen,
        "num_layers": cart.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cart.num_tokens,
        "peft_type": PEFT_TYPE,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": cart.kv_heads * cart.head_dim,
    }
    return {CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
            WEIGHTS_FILE: weights}
