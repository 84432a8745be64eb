"""``cart convert``: a cart cartridge <-> a Hugging Face PEFT CARTRIDGE adapter folder.

The input's format is detected: a folder is a PEFT adapter, a file (or ``-``) a cart
cartridge. Every other stage reads an adapter folder wherever it takes a cartridge (the one
loader, ``cart.cartridge.Cartridge.load``); this stage writes the other way, and turns
an adapter into a cartridge file once for good. The layout and what each direction keeps or
refuses are in ``cart.peft_adapter`` and ``cart-formats(5)``.
"""

from __future__ import annotations

import os
from typing import Any

from cart.io import CartError, Console, display_name

TARGETS = ("peft", "cart")


def convert(source: str, output: str | None, to: str | None = None, model: str | None = None,
            console: Console | None = None) -> Any:
    """Convert ``source`` to ``to`` (default: the other format) at ``output``; returns the
    cartridge converted."""
    from cart.cartridge import Cartridge
    from cart.io import check_output_dir, check_outputs
    from cart.peft_adapter import is_adapter_dir

    console = console or Console(quiet=True)
    folder = str(source) != "-" and os.path.isdir(source)
    to = to or ("cart" if folder else "peft")
    if to not in TARGETS:
        raise CartError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if to == "peft":
        if output is None:
            raise CartError("no output: give -o DIR (a PEFT adapter is a folder)")
        check_output_dir(output)
        if folder and os.path.realpath(output) == os.path.realpath(source):
            raise CartError(f"-o {output}: is the input {source}; choose another output folder")
        if os.path.isdir(output) and os.listdir(output) and not is_adapter_dir(output):
            raise CartError(f"-o {output}: exists and is not a PEFT adapter folder (no "
                            "adapter_config.json); choose another output folder")
    else:
        check_outputs({"-o": output}, [source])
    expect = _identity(model) if model is not None else None
    name = display_name(source)
    cart = Cartridge.load(source, expect, name, declared=model is not None)
    if to == "cart":
        cart.save(output)
        where = output if output not in (None, "-") else "<stdout>"
    else:
        from cart.io import write_folder
        from cart.peft_adapter import adapter_files, check_exportable

        check_exportable(cart, name)  # before looking for the base model
        base, ref = _base_model(cart, model, console)
        config = None
        if ref is not None and cart.query_position != cart.num_tokens:
            from cart.models import load_config

            config = load_config(ref)  # to move the keys where PEFT starts the queries
        write_folder(output, adapter_files(cart, base, name, config))
        where = output
    console.info(f"{where}: {to} {'adapter' if to == 'peft' else 'cartridge'} of "
                 f"{cart.num_tokens} tokens ({cart.num_frozen} frozen), {cart.metadata['base_model']}")
    return cart


def _identity(model: str):
    from cart.models import ModelIdentity, resolve_model

    return ModelIdentity.of(resolve_model(model, Console(quiet=True)))


def _base_model(cart: Any, model: str | None, console: Console) -> tuple[str, Any]:
    """What the adapter's ``base_model_name_or_path`` says, and the model found (None if it is
    not): the model folder (or hub id) that loads the cartridge's model, so
    ``AutoPeftModelForCausalLM`` finds it. With ``--model``, that model (the cartridge was
    checked against it); without, the model the cartridge names, when cart finds it locally
    as the same model; else the cartridge's model id as recorded, with a warning."""
    from cart.models import EMBEDDED_DIST, ModelIdentity, resolve_model

    if model is not None:
        ref = resolve_model(model)
        return ref.path, ref
    recorded = cart.metadata["base_model"]
    spec = None if recorded.startswith(EMBEDDED_DIST + "==") else recorded
    try:
        ref = resolve_model(spec)
        ident = ModelIdentity.of(ref)
    except CartError:
        ref = ident = None
    if ident is not None and (ident.config_hash, ident.tokenizer_hash) == (
            cart.metadata["model_config_hash"], cart.metadata["tokenizer_hash"]):
        return ref.path, ref
    console.warn(f"the cartridge's model {recorded} is not found locally: base_model_name_or_path "
                 "records its id (give --model to record a folder PEFT can load)")
    return recorded, None
