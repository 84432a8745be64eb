"""A vLLM KV-transfer connector that puts cartridges into vLLM's paged KV cache.

A request on a cartridge is sent to vLLM as ``p`` placeholder tokens followed by its own prompt,
with ``cache_salt`` = the cartridge's salt (a hash of its K/V content) and
``extra_args={"kv_transfer_params": {"cartridge": salt, "tokens": p}}``. vLLM asks this connector
how many of the prompt's leading tokens it can supply (``get_num_new_matched_tokens``): the
placeholder tokens its own prefix cache does not already hold. Their blocks are allocated, and
before the forward pass the worker half writes the cartridge's keys and values into them with
the attention backend's own cache-update op (``impl.do_kv_cache_update``), so nothing here
depends on how a backend lays out its cache. The request's own tokens start at position ``p``.

Prefix-cache safety. vLLM hashes a block by its tokens and, for the first block, the request's
``cache_salt``; placeholder tokens are the same for every cartridge, so the salt is all that
tells cartridges apart. The salt is the content hash, so two requests share placeholder blocks
only when they load the same K/V. The connector keeps that true whoever sends the request:
``on_new_request`` checks every request before the scheduler looks it up in the prefix cache.
A request carrying a cartridge salt that it does not load (it names no cartridge, another one,
or the wrong number of placeholder tokens), or naming a cartridge under a different salt, is
refused the prefix cache (``skip_reading_prefix_cache``) and loads nothing: it is computed from
its own tokens and can neither read a cartridge's blocks nor leave a cartridge's K/V behind
under a salt that does not name it. (``cart``'s engine refuses such requests before they reach
vLLM; this is the second line.)

The cartridges themselves are files in a spool directory private to one engine
(``kv_connector_extra_config["spool"]``), named by salt and written by the engine before the
request is added: ``k.{layer}``/``v.{layer}`` tensors ``[p, kv_heads, head_dim]``, keys already
rotated to the positions vLLM will use.

vLLM marks the connector API experimental: this is written against vllm 0.32 (pinned in
``cart[vllm]``).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                                 KVConnectorMetadata,
                                                                 KVConnectorRole)

log = logging.getLogger("cart.vllm")

SALT_PREFIX = "cart-kv-"  # every cartridge salt starts so; nothing else may use it
LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
LOADED_KEEP = 8  # cartridges the worker keeps in memory (by salt)


SALT_FORMAT = re.compile(SALT_PREFIX + r"(\d+)-[0-9a-f]{16,}")


def cartridge_salt(tokens: int, content_hash: str) -> str:
    """The salt of a cartridge of ``tokens`` positions whose K/V (as loaded) hash to
    ``content_hash``. The count is in the salt so that a request cannot load fewer positions
    than the blocks cached under the salt hold."""
    return f"{SALT_PREFIX}{tokens}-{content_hash}"


def is_cartridge_salt(salt: str | None) -> bool:
    return bool(salt) and salt.startswith(SALT_PREFIX)


def check_request(salt: str | None, params: dict | None, prompt_ids: list[int] | None,
                  placeholder: int) -> str | None:
    """Why a request must not use the prefix cache or load a cartridge (None: it is sound).
    Sound means: no cartridge salt and no cartridge; or a cartridge named by its own salt
    (which a "~suffix" may extend), with the salt's number of positions, loaded into that many
    leading placeholder tokens."""
    named = (params or {}).get("cartridge")
    if named is None:
        return f"cache_salt {salt} is a cartridge's but the request loads none" \
            if is_cartridge_salt(salt) else None
    found = SALT_FORMAT.fullmatch(named) if isinstance(named, str) else None
    if found is None or not (salt == named or (salt or "").startswith(named + "~")):
        return f"the request loads cartridge {named} under cache_salt {salt}"
    tokens = int(found.group(1))
    ids = prompt_ids or []
    if params.get("tokens") != tokens or len(ids) <= tokens or any(t != placeholder for t in ids[:tokens]):
        return f"the prompt does not start with the cartridge's {tokens} placeholder tokens"
    return None


@dataclass
class LoadSpec:
    """Write cartridge tokens ``start..end-1`` into these cache slots."""

    salt: str
    start: int
    end: int
    slots: list[int]


@dataclass
class CartridgeMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)


class CartridgeConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.spool = Path(extra["spool"])
        self.placeholder = int(extra["placeholder"])
        self.block_size = vllm_config.cache_config.block_size
        # K/V go to the backend's op in the model's dtype: it quantizes for an fp8 cache itself
        self.dtype = vllm_config.model_config.dtype
        self._pending: dict[str, tuple[str, int, int]] = {}  # request id -> (salt, start, end)
        self._refused: set[str] = set()
        self._loaded: OrderedDict[str, dict[str, Any]] = OrderedDict()  # worker: salt -> tensors

    # -- scheduler side ----------------------------------------------------------------------
    def on_new_request(self, request: Any) -> None:
        why = check_request(request.cache_salt, request.kv_transfer_params,
                            request.prompt_token_ids, self.placeholder)
        if why is not None:
            log.warning("request %s refused the prefix cache and any cartridge: %s",
                        request.request_id, why)
            request.skip_reading_prefix_cache = True
            self._refused.add(request.request_id)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        if request.request_id in self._refused or "cartridge" not in params:
            return 0, False
        # the placeholder tokens the prefix cache does not already hold (it holds whole blocks
        # of this cartridge only: their hash starts from the cartridge's salt)
        return max(0, params["tokens"] - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            params = request.kv_transfer_params
            end = params["tokens"]
            self._pending[request.request_id] = (params["cartridge"], end - num_external_tokens, end)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = CartridgeMetadata()
        # new requests, and requests resumed after a preemption (their blocks were freed: they
        # are allocated again and the cartridge loaded again); for a resumed request
        # new_block_ids holds all of its blocks
        scheduled = [(new.req_id, new.block_ids) for new in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        scheduled += [(rid, blocks) for rid, blocks in zip(cached.req_ids, cached.new_block_ids)
                      if rid in cached.resumed_req_ids and blocks is not None]
        for req_id, block_ids in scheduled:
            load = self._pending.pop(req_id, None)
            if load is None:
                continue
            salt, start, end = load
            blocks = block_ids[0]
            meta.loads.append(LoadSpec(salt, start, end, [
                blocks[t // self.block_size] * self.block_size + t % self.block_size
                for t in range(start, end)]))
        self._pending.clear()  # allocated but not scheduled: allocated again when it is
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._refused.discard(request.request_id)
        self._pending.pop(request.request_id, None)
        return False, None

    # -- worker side -------------------------------------------------------------------------
    def _tensors(self, salt: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        tensors = self._loaded.pop(salt, None)
        if tensors is None:
            tensors = load_file(str(self.spool / f"{salt}.safetensors"))
        self._loaded[salt] = tensors
        while len(self._loaded) > LOADED_KEEP:
            self._loaded.popitem(last=False)
        return tensors

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        import torch

        meta = self._get_connector_metadata()
        if not isinstance(meta, CartridgeMetadata) or not meta.loads:
            return
        for load in meta.loads:
            tensors = self._tensors(load.salt)
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                impl = getattr(layer, "impl", None)
                found = LAYER_INDEX.search(name)
                if cache is None or impl is None or found is None:
                    continue
                i = int(found.group(1))
                key = tensors[f"k.{i}"][load.start:load.end].to(device=cache.device, dtype=self.dtype)
                value = tensors[f"v.{i}"][load.start:load.end].to(device=cache.device, dtype=self.dtype)
                slots = torch.tensor(load.slots, dtype=torch.int64, device=cache.device)
                impl.do_kv_cache_update(layer, key, value, cache, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv writes every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # cartridges are only ever loaded

    def wait_for_save(self) -> None:
        return
