"""The cartridge file: one ``.safetensors`` holding a trained prefix KV cache.

Tensors (per layer ``i``; shapes ``[kv_heads, tokens, head_dim]``, keys post-RoPE at positions
``0..p-1``):

* ``frozen.{i}.keys`` / ``frozen.{i}.values``  -- the attention-sink token(s), never trained
* ``trainable.{i}.keys`` / ``trainable.{i}.values`` -- the rest of the p tokens
* ``bias.{i}`` (format 2, optional) -- ``[kv_heads, p]`` float32: an additive per-key term on the
  attention logits of every query (sink first), as attention-matching compaction fits it: key
  ``j`` of head ``h`` weighs ``exp(q.k_j * scale + bias[h, j])``. Files without it are format 1.

The flat (ragged) layout (format 3), for a model with H KV heads, keeps a different number of keys
per (layer, KV head): per layer ``l``, ``frozen.{l}.*`` is ``[1, H, head_dim]`` (the H sinks, head
h's in column h), ``trainable.{l}.*`` is ``[1, n_l, head_dim]`` (every head's other kept keys in
one row, grouped by head; ``n_l`` may differ between layers) and ``bias.{l}`` is ``[H, H + n_l]``
float32: row h holds head h's biases in its own columns and ``-inf`` in every other column (the
only place a cartridge may hold an infinity). One K/V row serves every head: a query of KV group
h scores every column and the ``-inf`` biases leave it only its own keys -- exactly the stored
keys in memory, at H times the score work on the (small) prefix. See ``flat_layer``.

``__metadata__`` (strings only; structured values are JSON strings) -- see ``cart-formats(5)``.
Loading goes through safetensors only: never pickle.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cart.io import CartError, atomic_output, read_input_bytes, sha256_hex

if TYPE_CHECKING:
    import torch

    from cart.models import ModelIdentity

FORMAT_NAME = "cart.cartridge"
# 3: the flat (ragged) layout; 2: per-key attention biases; 1: neither (each cartridge is written
# with the lowest that holds it)
FORMAT_MAJOR = 3
FORMAT = f"{FORMAT_NAME}/{FORMAT_MAJOR}"
READABLE_MAJORS = ("1", "2", "3")

# Metadata keys written by cart; those in _JSON_KEYS hold JSON, the rest plain strings/ints.
_REQUIRED_KEYS = ("format", "base_model", "model_config_hash", "tokenizer_hash", "p",
                  "num_frozen_tokens", "num_layers", "kv_heads", "head_dim", "dtype")
_INT_KEYS = ("p", "num_frozen_tokens", "num_layers", "kv_heads", "head_dim", "corpus_tokens",
             "steps", "tokens", "query_position")
_FLOAT_KEYS = ("loss",)
_JSON_KEYS = ("init", "synth", "training", "parts", "corpus_paths")

MAX_POSITION = 1 << 24  # a sanity bound on query_position

# The SHA-256 of the file's tensor data (every byte after the header), written by save() and
# verified on load when present (files of older versions have none): a flipped bit in a tensor
# is otherwise a valid file with different numbers.
CHECKSUM_KEY = "tensor_sha256"

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the safetensors dtypes a cartridge's tensors may have (K/V in any of these, biases F32)
_SAFETENSORS_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}


def flat_layer(keys, values, biases):
    """Per KV head h: keys[h], values[h] ``[n_h, d]`` and biases[h] ``[n_h]`` (index 0 of each is
    that head's sink) -> (keys, values ``[1, H + sum(n_h - 1), d]``, biases ``[H, H + sum(n_h - 1)]``
    float32): the H sinks first (head order), then each head's other keys in head order;
    -inf off the own head."""
    import torch

    heads = len(keys)
    if not heads or len(values) != heads or len(biases) != heads:
        raise ValueError(f"flat_layer: {len(keys)} keys, {len(values)} values and {len(biases)} "
                         "biases: one of each per KV head (at least one head)")
    for h, (k, v, b) in enumerate(zip(keys, values, biases)):
        if k.dim() != 2 or tuple(v.shape) != tuple(k.shape) or tuple(b.shape) != (k.shape[0],) or not k.shape[0]:
            raise ValueError(f"flat_layer: head {h}: keys {tuple(k.shape)}, values {tuple(v.shape)}, "
                             f"biases {tuple(b.shape)} are not [n, d], [n, d], [n] with n >= 1")
    flat_k = torch.cat([k[:1] for k in keys] + [k[1:] for k in keys])[None]
    flat_v = torch.cat([v[:1] for v in values] + [v[1:] for v in values])[None]
    out = torch.full((heads, flat_k.shape[1]), float("-inf"), dtype=torch.float32,
                     device=biases[0].device)
    start = heads
    for h, b in enumerate(biases):
        out[h, h] = b[0]
        out[h, start:start + b.shape[0] - 1] = b[1:]
        start += b.shape[0] - 1
    return flat_k, flat_v, out


def dtype_bytes(dtype: str) -> int:
    """Bytes of one K or V entry in ``dtype`` (float32, bfloat16 or float16)."""
    return _DTYPE_BYTES[dtype]


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    """Bytes of KV cache one token takes in a model: layers x (K and V) x heads x dim x size."""
    return num_layers * 2 * kv_heads * head_dim * dtype_bytes(dtype)


@dataclass
class Cartridge:
    """A prefix KV cache: frozen sink token(s) + trainable tokens, per layer, plus metadata.

    Rectangular: per layer ``[kv_heads, tokens, head_dim]`` K/V, the same token counts in every
    layer, optional ``[kv_heads, p]`` biases. Flat (``flat``, see the module doc and
    ``from_flat_layers``): per layer ``[1, H, head_dim]`` frozen and ``[1, n_l, head_dim]``
    trainable K/V, ``[H, H + n_l]`` biases (required; ``-inf`` off each head's columns)."""

    frozen_keys: list[torch.Tensor]
    frozen_values: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    # per layer [kv_heads, p] float32 additive attention-logit terms (sink first), or None
    biases: list[torch.Tensor] | None = None
    # what ``load`` read: the SHA-256 and size of the bytes (a folder's, as converted)
    file_sha256: str | None = field(default=None, compare=False, repr=False)
    file_bytes: int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        n = len(self.keys)
        if not (n and len(self.values) == len(self.frozen_keys) == len(self.frozen_values) == n):
            raise ValueError("a cartridge needs the same number (>0) of K/V tensors per kind")
        ref = self.keys[0]
        if ref.dim() != 3:
            raise ValueError(f"trainable.keys.0: shape {tuple(ref.shape)} is not [kv_heads, p, head_dim]")
        if self.biases is not None:
            if len(self.biases) != n:
                raise ValueError(f"{len(self.biases)} bias tensors for {n} layers")
            for i, b in enumerate(self.biases):
                if b.dim() != 2:
                    raise ValueError(f"bias.{i}: shape {tuple(b.shape)} is not [kv_heads, p]")
        flat = self.flat
        for name, group in (("frozen.keys", self.frozen_keys), ("frozen.values", self.frozen_values),
                            ("trainable.keys", self.keys), ("trainable.values", self.values)):
            for i, t in enumerate(group):
                if t.dim() != 3 or t.shape[0] != ref.shape[0] or t.shape[2] != ref.shape[2]:
                    raise ValueError(f"{name}.{i}: shape {tuple(t.shape)} does not match "
                                     f"[{ref.shape[0]}, *, {ref.shape[2]}]")
                if t.dtype != ref.dtype:
                    raise ValueError(f"{name}.{i}: dtype {t.dtype} differs from {ref.dtype}")
        for ks, vs, kind in ((self.frozen_keys, self.frozen_values, "frozen"),
                             (self.keys, self.values, "trainable")):
            if flat and kind == "trainable":  # ragged: each layer its own count
                for i, (k, v) in enumerate(zip(ks, vs)):
                    if k.shape[1] != v.shape[1]:
                        raise ValueError(f"trainable.{i}.values: {v.shape[1]} tokens, "
                                         f"trainable.{i}.keys {k.shape[1]}")
                continue
            lengths = {t.shape[1] for t in ks} | {t.shape[1] for t in vs}
            if len(lengths) != 1:
                raise ValueError(f"{kind} tensors differ in token count: {sorted(lengths)}")
        if flat and self.frozen_columns != self.kv_heads:
            raise ValueError(f"frozen.0.keys: shape {tuple(self.frozen_keys[0].shape)} is not "
                             f"[1, {self.kv_heads}, {self.head_dim}] (a flat cartridge's sinks, one "
                             f"per row of bias.0)")
        if self.biases is not None:
            import torch

            for i, b in enumerate(self.biases):
                want = (self.kv_heads, self.frozen_columns + int(self.keys[i].shape[1]))
                if tuple(b.shape) != want:
                    raise ValueError(f"bias.{i}: shape {tuple(b.shape)} is not {list(want)}")
                # (NaN is refused where it is read or written, with the other tensors')
                dead = torch.isneginf(b).all(dim=1).nonzero()
                if len(dead):  # its queries would attend to nothing: softmax of all -inf is NaN
                    raise ValueError(f"bias.{i}: row {int(dead[0])} is all -inf (KV head "
                                     f"{int(dead[0])} would attend to no key)")

    @classmethod
    def from_flat_layers(cls, layers, metadata: dict[str, Any] | None = None) -> Cartridge:
        """A flat cartridge from per-layer ``flat_layer`` outputs (keys, values ``[1, H + n_l,
        d]``, biases ``[H, H + n_l]``): columns ``[:H]`` (the sinks) frozen, the rest trainable."""
        heads = [int(b.shape[0]) for _, _, b in layers]
        return cls([k[:, :h] for (k, _, _), h in zip(layers, heads)],
                   [v[:, :h] for (_, v, _), h in zip(layers, heads)],
                   [k[:, h:] for (k, _, _), h in zip(layers, heads)],
                   [v[:, h:] for (_, v, _), h in zip(layers, heads)],
                   metadata=dict(metadata or {}), biases=[b for _, _, b in layers])

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def flat(self) -> bool:
        """The flat (ragged) layout: one K/V row shared by the H KV heads, whose biases ``[H,
        columns]`` give each head its own columns (module doc). A one-head flat cartridge with
        the same count in every layer is the same thing as a rectangular one, and is one."""
        b = self.biases
        if b is None or self.keys[0].shape[0] != 1:
            return False
        return b[0].shape[0] > 1 or len({int(k.shape[1]) for k in self.keys}) > 1

    @property
    def kv_heads(self) -> int:
        """The model's KV heads (a flat cartridge's: its biases' rows)."""
        return int(self.biases[0].shape[0]) if self.flat else int(self.keys[0].shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def num_frozen(self) -> int:
        """Frozen (sink) positions per KV head: 1 in a flat cartridge (its H frozen columns are
        one sink per head; ``frozen_columns``)."""
        return 1 if self.flat else self.frozen_columns

    @property
    def frozen_columns(self) -> int:
        """The frozen tensors' token count: ``num_frozen``, or H in a flat cartridge."""
        return int(self.frozen_keys[0].shape[1])

    @property
    def num_tokens(self) -> int:
        """p: the number of KV positions the cartridge occupies per head (frozen + trainable).
        For a flat cartridge, the average over heads and layers, rounded up: ceil(stored K
        columns of all layers / (H x layers)) -- ``kv_bytes`` is exact."""
        if self.flat:
            columns = sum(int(f.shape[1] + k.shape[1]) for f, k in zip(self.frozen_keys, self.keys))
            return -(-columns // (self.kv_heads * self.num_layers))
        return self.num_frozen + int(self.keys[0].shape[1])

    @property
    def query_position(self) -> int:
        """Where the tokens after the cartridge start: p, except for a composed cartridge,
        whose parts were each trained with queries at their own p (the largest is used)."""
        return int(self.metadata.get("query_position") or self.num_tokens)

    @property
    def dtype(self) -> str:
        return str(self.keys[0].dtype).removeprefix("torch.")

    @property
    def kv_elements(self) -> int:
        """The number of stored key and value entries, all layers (biases not counted)."""
        return sum(t.numel() for group in (self.frozen_keys, self.frozen_values, self.keys,
                                           self.values) for t in group)

    def kv_bytes(self, dtype: str | None = None) -> int:
        """Bytes of the stored keys and values (exact, flat or not; biases not counted), in
        ``dtype`` (a ``_DTYPE_BYTES`` name; default the cartridge's own)."""
        return self.kv_elements * dtype_bytes(dtype or self.dtype)

    @property
    def format(self) -> str:
        major = 3 if self.flat else 2 if self.biases is not None else 1
        return f"{FORMAT_NAME}/{major}"

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full ``[kv_heads, p, head_dim]`` keys and values of layer ``i`` (sink first); a
        flat cartridge's ``[1, H + n_i, head_dim]`` (the H sinks first)."""
        import torch

        return (torch.cat([self.frozen_keys[i], self.keys[i]], dim=1),
                torch.cat([self.frozen_values[i], self.values[i]], dim=1))

    # -- identity ----------------------------------------------------------------------------
    def check_compatible(self, model: ModelIdentity, name: str = "cartridge") -> None:
        """Refuse a cartridge trained for another model, clearly."""
        md = self.metadata
        if md.get("model_config_hash") != model.config_hash:
            raise CartError(
                f"{name}: trained for model {md.get('base_model')} (config {md.get('model_config_hash')}), "
                f"not {model.model_id} (config {model.config_hash})"
            )
        if md.get("tokenizer_hash") != model.tokenizer_hash:
            raise CartError(
                f"{name}: trained with another tokenizer ({md.get('tokenizer_hash')}) than "
                f"{model.model_id} uses ({model.tokenizer_hash})"
            )
        shape = (self.num_layers, self.kv_heads, self.head_dim)
        if shape != (model.num_layers, model.kv_heads, model.head_dim):
            raise CartError(f"{name}: KV shape (layers, kv heads, head dim) {shape} does not match "
                            f"{model.model_id}'s {(model.num_layers, model.kv_heads, model.head_dim)}")

    # -- files -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(self.num_layers):
            out[f"frozen.{i}.keys"] = self.frozen_keys[i]
            out[f"frozen.{i}.values"] = self.frozen_values[i]
            out[f"trainable.{i}.keys"] = self.keys[i]
            out[f"trainable.{i}.values"] = self.values[i]
            if self.biases is not None:
                out[f"bias.{i}"] = self.biases[i].float()
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def full_metadata(self) -> dict[str, Any]:
        """The metadata with shape fields derived from the tensors (never stale)."""
        from cart import __version__

        md = dict(self.metadata)
        md.setdefault("cart_version", __version__)
        md.setdefault("created", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        md.update(format=self.format, p=self.num_tokens, num_frozen_tokens=self.num_frozen,
                  num_layers=self.num_layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                  dtype=self.dtype)
        return md

    def to_bytes(self) -> bytes:
        """The file, with the checksum of its tensor data in the metadata. The data section
        does not depend on the metadata, so it is hashed from a first serialisation."""
        from safetensors.torch import save

        tensors = self.tensors()
        metadata = encode_metadata(self.full_metadata())
        metadata.pop(CHECKSUM_KEY, None)  # a loaded cartridge's: recomputed
        metadata[CHECKSUM_KEY] = data_section_sha256(save(tensors, metadata=metadata))
        return save(tensors, metadata=metadata)

    def save(self, path: str | os.PathLike | None) -> None:
        """Write atomically (temp file + rename); ``-``/None writes to stdout. A cartridge with
        NaN or infinite values is refused: every reader would fail on it, or answer nonsense."""
        bad = _non_finite(self.tensors())
        if bad is not None:
            name = "<stdout>" if path is None or str(path) == "-" else str(path)
            raise CartError(f"{name}: not written: tensor {bad} of the cartridge holds NaN or "
                            "infinite values")
        data = self.to_bytes()
        with atomic_output(path) as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: ModelIdentity | None = None, name: str | None = None,
             declared: bool = False, shown: str | None = None) -> Cartridge:
        """The one loader: a cartridge file, ``-`` (stdin), or a PEFT CARTRIDGE adapter folder
        (converted); ``name`` in errors (default the path), the rest as ``read_cartridge_bytes``.
        Sets ``file_sha256`` and ``file_bytes``."""
        data = read_cartridge_bytes(path, expect, declared, shown)
        cart = cls.from_bytes(data, str(path) if name is None else name, expect)
        cart.file_sha256, cart.file_bytes = sha256_hex(data), len(data)
        return cart

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "cartridge",
                   expect: ModelIdentity | None = None) -> Cartridge:
        from safetensors import SafetensorError
        from safetensors.torch import load

        metadata = read_metadata_bytes(data, name)
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CartError(f"{name}: corrupt cartridge file ({_one_line(e)})") from None
        bad = _non_finite(tensors)
        if bad is not None:
            raise CartError(f"{name}: corrupt cartridge file (tensor {bad} holds NaN or "
                            "infinite values)")
        n = metadata["num_layers"]
        try:
            groups = [[tensors[f"{kind}.{i}.{part}"] for i in range(n)]
                      for kind, part in (("frozen", "keys"), ("frozen", "values"),
                                         ("trainable", "keys"), ("trainable", "values"))]
            biases = None
            if any(k.startswith("bias.") for k in tensors):
                biases = [tensors[f"bias.{i}"] for i in range(n)]
        except KeyError as e:
            raise CartError(f"{name}: corrupt cartridge file (missing tensor {e.args[0]})") from None
        # a file with more layers than its metadata says (or foreign tensors) is not this one
        used = sum(len(g) for g in groups) + (len(biases) if biases is not None else 0)
        if used != len(tensors):
            extra = sorted(set(tensors) - {f"{kind}.{i}.{part}" for i in range(n)
                                           for kind in ("frozen", "trainable")
                                           for part in ("keys", "values")}
                           - {f"bias.{i}" for i in range(n)})
            raise CartError(f"{name}: corrupt cartridge file (unexpected tensor {extra[0]}; the "
                            f"metadata says num_layers={n})")
        major = metadata["format"].split("/", 1)[1].split(".")[0]
        if (biases is not None) != (major in ("2", "3")):
            raise CartError(f"{name}: corrupt cartridge file (format {metadata['format']} "
                            f"{'without' if biases is None else 'with'} attention biases)")
        try:
            cart = cls(*groups, metadata=metadata, biases=biases)
        except ValueError as e:
            raise CartError(f"{name}: corrupt cartridge file ({e})") from None
        if cart.flat != (major == "3"):
            raise CartError(f"{name}: corrupt cartridge file (format {metadata['format']} "
                            f"{'with' if cart.flat else 'without'} the flat layout)")
        shape_keys = ("p", "num_frozen_tokens", "num_layers", "kv_heads", "head_dim", "dtype")
        if (cart.num_tokens, cart.num_frozen, cart.num_layers, cart.kv_heads, cart.head_dim,
                cart.dtype) != tuple(metadata[k] for k in shape_keys):
            raise CartError(f"{name}: corrupt cartridge file (tensors do not match the metadata: "
                            f"p={cart.num_tokens}, frozen={cart.num_frozen}, "
                            f"layers={cart.num_layers}, kv_heads={cart.kv_heads}, "
                            f"head_dim={cart.head_dim}, dtype={cart.dtype})")
        qp = metadata.get("query_position")
        # compacted keys keep their corpus positions: queries may start past p
        if qp is not None and not 1 <= qp <= MAX_POSITION:
            raise CartError(f"{name}: corrupt cartridge metadata (query_position {qp} outside "
                            f"1..{MAX_POSITION})")
        if expect is not None:
            cart.check_compatible(expect, name)
        return cart


def encode_metadata(md: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: JSON-encode structured values."""
    out = {}
    for k, v in md.items():
        if v is None:
            continue
        out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


def decode_metadata(raw: dict[str, str], name: str) -> dict[str, Any]:
    md: dict[str, Any] = dict(raw)
    for k in _REQUIRED_KEYS:
        if k not in md:
            raise CartError(f"{name}: not a cart cartridge (metadata lacks '{k}')")
    if md["dtype"] not in _DTYPE_BYTES:
        raise CartError(f"{name}: corrupt cartridge metadata (dtype {md['dtype']!r} is not one of "
                        f"{', '.join(_DTYPE_BYTES)})")
    try:
        for k in _INT_KEYS:
            if k in md:
                md[k] = int(md[k])
        for k in _FLOAT_KEYS:
            if k in md:
                md[k] = float(md[k])
        for k in _JSON_KEYS:
            if k in md:
                md[k] = json.loads(md[k])
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: absurd nesting
        raise CartError(f"{name}: corrupt cartridge metadata ({_one_line(e)})") from None
    return md


def read_metadata_bytes(data: bytes, name: str) -> dict[str, Any]:
    """Parse and check the header of a cartridge file without building tensors: its structure
    (before anything uses it), its format, and the checksum of the tensor data if it has one."""
    raw = safetensors_header(data, name).get("__metadata__") or {}
    fmt = raw.get("format", "")
    if not fmt.startswith(FORMAT_NAME + "/"):
        raise CartError(f"{name}: not a cart cartridge (metadata format is {fmt or 'missing'!r})")
    major = fmt.split("/", 1)[1].split(".", 1)[0]
    if major not in READABLE_MAJORS:
        raise CartError(f"{name}: unsupported cartridge format {fmt} (this cart reads "
                        f"{FORMAT_NAME}/{', /'.join(READABLE_MAJORS[:-1])} and /{READABLE_MAJORS[-1]})")
    checksum = raw.get(CHECKSUM_KEY)
    if checksum is not None and checksum != data_section_sha256(data):
        raise CartError(f"{name}: corrupt cartridge file (the tensor data does not match the "
                        f"checksum in its metadata: damaged or edited)")
    return decode_metadata(raw, name)


def safetensors_header(data: bytes, name: str) -> dict[str, Any]:
    """The checked header of a safetensors file (a cartridge, or a PEFT adapter's weights):
    its structure, before anything uses it, and that it describes exactly the bytes given."""
    if len(data) < 8:
        raise CartError(f"{name}: not a cartridge file (empty or truncated)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CartError(f"{name}: not a cartridge file (truncated or not safetensors)")
    try:
        header = json.loads(data[8:8 + header_len])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CartError(f"{name}: not a cartridge file (corrupt safetensors header)") from None
    if not isinstance(header, dict):
        raise CartError(f"{name}: not a cartridge file (corrupt safetensors header)")
    end = _check_header(header, name)
    if 8 + header_len + end != len(data):
        raise CartError(f"{name}: corrupt cartridge file (expected {8 + header_len + end} bytes, "
                        f"found {len(data)}: truncated?)")
    return header


def _check_header(header: dict, name: str) -> int:
    """Refuse a safetensors header that is not what safetensors writes for a cartridge
    (crafted or damaged: metadata that is not strings, offsets that are not pairs of integers,
    dtypes a cartridge never has, tensors that overlap or leave gaps). Returns the length of
    the data section it describes."""

    def bad(problem: str) -> CartError:
        return CartError(f"{name}: corrupt cartridge file (safetensors header: {problem})")

    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map strings to strings")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise bad(f"tensor {key!r} has dtype {dtype!r}, not one of "
                      f"{', '.join(_SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"tensor {key!r}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor {key!r}: data_offsets must be two integers [begin, end], "
                      "0 <= begin <= end")
        size = _SAFETENSORS_DTYPES[dtype]
        for d in shape:
            size *= d
        if offsets[1] - offsets[0] != size:
            raise bad(f"tensor {key!r}: data_offsets span {offsets[1] - offsets[0]} bytes, its "
                      f"shape and dtype need {size}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise bad(f"tensor {key!r}: data_offsets overlap another tensor or leave a gap")
        end = stop
    return end


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def data_section_sha256(data: bytes) -> str:
    """The SHA-256 of a safetensors file's data section (what follows the header)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(memoryview(data)[8 + header_len:]).hexdigest()


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None. ``bias.*`` tensors
    may hold -inf (a key its head does not attend to: the flat layout), nothing else may."""
    import torch

    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        ok = torch.isfinite(t)
        if key.startswith("bias."):
            ok |= t == float("-inf")
        if not bool(ok.all()):
            return key
    return None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return read_metadata_bytes(read_cartridge_bytes(path), str(path))


def has_biases(path: str | os.PathLike) -> bool:
    """Whether the cartridge file at ``path`` carries attention biases (formats 2 and 3), from
    the format in its safetensors header alone: a choice made before loading (the engine), so
    the tensors are not read twice. False for stdin (read once, later), for a PEFT adapter
    folder (PEFT has no biases) and for what cannot be read: its loader reports that."""
    if str(path) == "-" or os.path.isdir(path):
        return False
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            fmt = json.loads(f.read(header_len))["__metadata__"]["format"]
        return fmt.startswith(FORMAT_NAME + "/") and fmt.split("/", 1)[1].split(".")[0] in ("2", "3")
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError, RecursionError):
        return False


def read_cartridge_bytes(path: str | os.PathLike, expect: ModelIdentity | None = None,
                         declared: bool = False, shown: str | None = None) -> bytes:
    """The one reader of a cartridge input: the bytes of a cartridge file (``-``: stdin), or
    of the cartridge a PEFT CARTRIDGE adapter folder holds, converted in memory
    (``cart.peft_adapter``; ``expect``, ``declared`` and ``shown`` as ``read_adapter`` takes
    them). Every stage that takes a cartridge reads it here, so each takes an adapter folder."""
    if str(path) != "-" and os.path.isdir(path):
        from cart.peft_adapter import read_adapter

        return read_adapter(path, expect, declared, shown).to_bytes()
    return read_input_bytes(path, "cartridge file")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
