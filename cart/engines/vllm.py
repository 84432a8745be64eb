"""The vLLM engine: ``--engine vllm`` for synth, eval and serve.

Generation and the teacher's top-k come from vLLM's own sampler (``logprobs=k``, in vLLM's
default ``raw_logprobs`` mode: the model's unprocessed distribution, as the transformers engine
records it); teacher-forced scoring from ``prompt_logprobs``. Cartridges go into vLLM's paged KV
cache through ``cart.engines.vllm_connector`` (a KV-transfer connector): a request on a
cartridge is ``p`` placeholder tokens plus its prompt, salted with the cartridge's content hash,
and the connector writes the cartridge's K/V into the placeholders' blocks. Requests on
different cartridges, or none, are batched together by vLLM's scheduler.

Install with ``pip install 'cart[vllm]'`` (GPU) or the CPU recipe in the README. vLLM runs its
engine core in a separate process: a script using this engine needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cart.engines.base import (Engine, Generation, GenerationRequest, KVPrefix, RunningBatch, ScoreRequest,
                               StepEvent, TopK, eos_token_ids, loop_start)
from cart.io import CartError

VLLM_VERSION = "0.32.0"  # the connector API is experimental: cart[vllm] pins this release


# vLLM's attention kernels take no per-key logit bias: refuse rather than ignore it
BIAS_REFUSED = ("the vLLM engine cannot apply a cartridge's per-key attention biases (formats "
                "cart.cartridge/2 and /3, made by compaction): use --engine transformers")


def _defaults_for_cpu() -> None:
    """vLLM's CPU backend settings, unless the user set them: a KV cache of 2 GiB (its default
    takes a share of RAM that a small machine cannot spare) and OpenMP threads bound to the CPUs
    this process may use."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # its worker processes import modules that raise FutureWarnings on this torch
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")


def first_loop_cut(tokens: list[int]) -> int | None:
    """Where the transformers engine, checking after every token, would have cut a looping
    generation (None: it never loops): the same rule applied to vLLM's finished output."""
    for end in range(1, len(tokens) + 1):
        cut = loop_start(tokens[:end])
        if cut is not None:
            return cut
    return None


@dataclass(eq=False)
class VLLMRow:
    """One request in flight in vLLM (``cart serve``'s scheduler sees it as a batch row)."""

    request: GenerationRequest
    request_id: str
    out: Generation


class VLLMEngine(Engine):
    def __init__(self, llm: Any, tokenizer: Any, identity: Any, config: Any, spool: Path,
                 max_context: int, max_logprobs: int):
        self.llm = llm
        self.tokenizer = tokenizer
        self.identity = identity
        self.config = config
        self.spool = spool
        self.max_context = max_context
        self.max_logprobs = max_logprobs
        self.eos_token_ids = eos_token_ids(config.eos_token_id, tokenizer)
        self.placeholder = placeholder_id(tokenizer)
        self._salts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVPrefix -> salt
        self._salt_users: dict[str, int] = {}  # salt -> KVPrefix objects alive with it
        self._spool_lock = threading.Lock()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._live: set[str] = set()  # request ids added and not finished

    @classmethod
    def load(cls, model: str | None, dtype: str = "float32", device: str = "auto", console=None,
             max_logprobs: int = 20, max_model_len: int | None = None,
             engine_args: dict[str, Any] | None = None):
        """``engine_args``: more ``vllm.EngineArgs`` fields (e.g. ``gpu_memory_utilization``)."""
        from cart.models import (ModelIdentity, context_length, load_config, load_tokenizer, resolve_device,
                                 resolve_model)

        _defaults_for_cpu()  # before vLLM is imported: it reads them then
        try:
            import vllm
        except ImportError:
            raise CartError("--engine vllm needs vLLM: pip install 'cart[vllm]' (GPU), or see "
                            "the README for the CPU recipe") from None
        if vllm.__version__.split("+")[0] != VLLM_VERSION:
            raise CartError(f"--engine vllm needs vllm {VLLM_VERSION} (its KV-connector API is "
                            f"experimental); this is {vllm.__version__}")
        ref = resolve_model(model, console)
        tokenizer = load_tokenizer(ref)
        config = load_config(ref)
        context = min(context_length(config), max_model_len or (1 << 30))
        spool = Path(tempfile.mkdtemp(prefix="cart-vllm-kv-"))
        from vllm import EngineArgs, LLMEngine
        from vllm.config import KVTransferConfig

        kv = KVTransferConfig(kv_connector="CartridgeConnector", kv_role="kv_both",
                              kv_connector_module_path="cart.engines.vllm_connector",
                              kv_connector_extra_config={"spool": str(spool),
                                                         "placeholder": placeholder_id(tokenizer)})
        args = dict(model=ref.path, tokenizer=ref.path, dtype=dtype, seed=0,
                    max_model_len=context, max_logprobs=max_logprobs,
                    enable_prefix_caching=True, kv_transfer_config=kv, use_tqdm_on_load=False,
                    # CUDA graphs pay off on a GPU; on a CPU compiling costs a minute
                    enforce_eager=resolve_device(device).split(":")[0] == "cpu")
        args.update(engine_args or {})
        try:
            llm = LLMEngine.from_engine_args(EngineArgs(**args))
        except Exception as e:
            shutil.rmtree(spool, ignore_errors=True)
            raise CartError(f"vLLM could not start {ref.model_id}: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        engine = cls(llm, tokenizer, ModelIdentity.of(ref, config, tokenizer), config, spool,
                     context, max_logprobs)
        engine._finalizer = weakref.finalize(engine, _shut_down, llm, str(spool))
        return engine

    def close(self) -> None:
        """Stop vLLM's engine process and remove the spool now (else: at exit)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    # -- cartridges ---------------------------------------------------------------------------
    def salt_of(self, kv_prefix: KVPrefix) -> str:
        """The KV prefix written to the spool as the connector loads it (keys moved to vLLM's
        positions, ``[p, kv_heads, head_dim]``), named by the hash of exactly those bytes: its
        ``cache_salt``. Made once per KVPrefix object."""
        import torch
        from safetensors.torch import save_file

        from cart.engines.vllm_connector import cartridge_salt
        from cart.kvcache import move_keys

        if kv_prefix.bias is not None:
            raise CartError(BIAS_REFUSED)
        with self._spool_lock:
            salt = self._salts.get(kv_prefix)
        if salt is not None:
            return salt
        shift = kv_prefix.num_tokens - kv_prefix.query_position
        tensors, digest = {}, hashlib.sha256()
        for i, (k, v) in enumerate(kv_prefix.kv):
            k = move_keys(self.config, k.detach().to("cpu", torch.float32), shift)
            for name, t in ((f"k.{i}", k), (f"v.{i}", v.detach().to("cpu", torch.float32))):
                t = t.transpose(0, 1).contiguous()  # [p, kv_heads, head_dim]
                tensors[name] = t
                digest.update(name.encode() + str(tuple(t.shape)).encode())
                digest.update(t.numpy().tobytes())
        salt = cartridge_salt(kv_prefix.num_tokens, digest.hexdigest()[:48])
        path = self.spool / f"{salt}.safetensors"
        with self._spool_lock:
            if not path.exists():
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file(tensors, str(tmp))
                os.replace(tmp, path)
            self._salts[kv_prefix] = salt
            self._salt_users[salt] = self._salt_users.get(salt, 0) + 1
        # the file goes when the last KVPrefix with this content does (a request in flight
        # holds its KVPrefix, so it can always be loaded again after a preemption)
        weakref.finalize(kv_prefix, self._release, salt)
        return salt

    def _release(self, salt: str) -> None:
        with self._spool_lock:
            self._salt_users[salt] -= 1
            if self._salt_users[salt] == 0:
                del self._salt_users[salt]
                (self.spool / f"{salt}.safetensors").unlink(missing_ok=True)

    def vllm_prompt(self, prompt_ids: list[int], kv_prefix: KVPrefix | None) -> tuple[dict, dict | None]:
        """(vLLM prompt, kv_transfer_params) of a prompt after an optional KV prefix."""
        if kv_prefix is None:
            return {"prompt_token_ids": list(prompt_ids)}, None
        salt = self.salt_of(kv_prefix)
        return ({"prompt_token_ids": [self.placeholder] * kv_prefix.num_tokens + list(prompt_ids),
                 "cache_salt": salt}, {"cartridge": salt, "tokens": kv_prefix.num_tokens})

    def submit(self, prompt: dict, params: Any) -> str:
        """Add one request to vLLM after checking that it cannot read or leave behind a
        cartridge's prefix-cache blocks without loading that cartridge (poisoning)."""
        from cart.engines.vllm_connector import check_request

        transfer = (params.extra_args or {}).get("kv_transfer_params")
        why = check_request(prompt.get("cache_salt"), transfer, prompt.get("prompt_token_ids"),
                            self.placeholder)
        if why is not None:
            raise ValueError(f"request refused: {why} (it would share a cartridge's cached KV "
                             f"blocks without loading that cartridge)")
        request_id = f"cart-{next(self._ids)}"
        with self._lock:
            self.llm.add_request(request_id, prompt, params)
            self._live.add(request_id)
        return request_id

    def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            live = [r for r in request_ids if r in self._live]
            self._live.difference_update(live)
            if live:
                self.llm.abort_request(live)

    def step(self) -> list[Any]:
        with self._lock:
            outs = self.llm.step()
            for out in outs:
                if out.finished:
                    self._live.discard(out.request_id)
            return outs

    # -- generation ---------------------------------------------------------------------------
    def sampling_params(self, r: GenerationRequest, seed: int, transfer: dict | None,
                        delta: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if r.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if r.top_k_logprobs > self.max_logprobs:
            raise ValueError(f"top-k {r.top_k_logprobs} is above this engine's max_logprobs "
                             f"{self.max_logprobs}")
        return SamplingParams(
            max_tokens=r.max_new_tokens, temperature=r.temperature,
            seed=seed % (1 << 63) if r.temperature > 0 else None,
            logprobs=r.top_k_logprobs or None, ignore_eos=r.ignore_eos,
            # vLLM's ignore_eos ignores only the tokenizer's EOS, not stop_token_ids
            stop_token_ids=[] if r.ignore_eos else sorted(self.eos_token_ids), detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
            extra_args=extra_args(transfer))

    def add(self, r: GenerationRequest, seed: int, delta: bool = False) -> str:
        prompt, transfer = self.vllm_prompt(r.prompt_ids, r.kv_prefix)
        return self.submit(prompt, self.sampling_params(r, seed, transfer, delta))

    def generation(self, r: GenerationRequest, token_ids: list[int], logprobs: Any,
                   finished: bool) -> Generation:
        """vLLM's output as the transformers engine reports it (a loop cut the same way)."""
        out = Generation(list(token_ids), finished)
        if r.top_k_logprobs:
            out.topk = [topk_of(step, r.top_k_logprobs) for step in logprobs]
        if r.stop_loops and (cut := first_loop_cut(out.token_ids)) is not None:
            del out.token_ids[cut:], out.topk[cut:]
            out.looped, out.finished = True, False
        return out

    def generate(self, requests: list[GenerationRequest], seed: int) -> list[Generation]:
        ids = []
        try:
            for i, r in enumerate(requests):
                ids.append(self.add(r, r.seed if r.seed is not None else seed * 1_000_003 + i))
            done = self._run(ids)
        except BaseException:
            self.abort(ids)
            raise
        out = []
        for r, rid in zip(requests, ids):
            c = done[rid].outputs[0]
            out.append(self.generation(r, c.token_ids, c.logprobs, end_reason(c, r) == "eos"))
        return out

    def _run(self, ids: list[str]) -> dict[str, Any]:
        want, done = set(ids), {}
        while want - done.keys():
            for out in self.step():
                if out.request_id in want and out.finished:
                    done[out.request_id] = out
        return done

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        from vllm import SamplingParams

        ids, spans = [], []
        try:
            for r in requests:
                if not 0 < r.target_start < len(r.prompt_ids):
                    raise ValueError(f"target_start {r.target_start} outside 1..{len(r.prompt_ids) - 1}")
                prompt, transfer = self.vllm_prompt(r.prompt_ids, r.kv_prefix)
                offset = len(prompt["prompt_token_ids"]) - len(r.prompt_ids)
                # prompt_logprobs would skip the prefix cache, and with it the cartridge
                # (the connector's tokens count as cached): read it, but make the request's own
                # tokens miss it (a nonce in the salt), since cached tokens get no log-probs
                prompt["cache_salt"] = f"{prompt.get('cache_salt') or 'cart-score'}~{next(self._ids)}"
                params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                        skip_reading_prefix_cache=False,
                                        extra_args=extra_args(transfer))
                ids.append(self.submit(prompt, params))
                spans.append((offset + r.target_start, offset + len(r.prompt_ids)))
            done = self._run(ids)
        except BaseException:
            self.abort(ids)
            raise
        out = []
        for r, rid, (start, end) in zip(requests, ids, spans):
            plp = done[rid].prompt_logprobs
            tokens = done[rid].prompt_token_ids
            out.append([plp[t][tokens[t]].logprob for t in range(start, end)])
        return out

    # -- serving ------------------------------------------------------------------------------
    def open_batch(self) -> VLLMBatch:
        return VLLMBatch(self)


class VLLMBatch(RunningBatch):
    """``cart serve``'s view of vLLM: requests join (``add``) and leave (``drop``) at any
    step; vLLM's own scheduler batches them (continuous batching, chunked prefill, paged KV)."""

    def __init__(self, engine: VLLMEngine):
        self.engine = engine
        self.rows: dict[str, VLLMRow] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: list[GenerationRequest], seeds: list[int]) -> list[VLLMRow]:
        rows = []
        try:
            for r, seed in zip(requests, seeds):
                rows.append(VLLMRow(r, self.engine.add(r, seed, delta=True), Generation([], False)))
        except BaseException:
            self.engine.abort([row.request_id for row in rows])
            raise
        for row in rows:
            self.rows[row.request_id] = row
        return rows

    def drop(self, rows: list[VLLMRow]) -> None:
        for row in rows:
            self.rows.pop(row.request_id, None)
        self.engine.abort([row.request_id for row in rows])

    def kv_bytes(self) -> int:
        """KV the running requests hold in vLLM's paged cache (cartridge, prompt and generated
        tokens; blocks vLLM shares between requests are counted for each)."""
        from cart.cartridge import kv_bytes_per_token

        ident = self.engine.identity
        # counted in float32 (an upper bound for a 16-bit cache)
        per_token = kv_bytes_per_token(ident.num_layers, ident.kv_heads, ident.head_dim, "float32")
        return per_token * sum((row.request.kv_prefix.num_tokens if row.request.kv_prefix else 0)
                               + len(row.request.prompt_ids) + len(row.out.token_ids)
                               for row in self.rows.values())

    def step(self) -> list[StepEvent]:
        if not self.rows:
            return []
        events = []
        for out in self.engine.step():
            row = self.rows.get(out.request_id)
            if row is None:
                continue
            c = out.outputs[0]
            new = list(c.token_ids)
            for j, token in enumerate(new):
                row.out.token_ids.append(token)
                last = j == len(new) - 1 and out.finished
                events.append(StepEvent(row, token, last, end_reason(c, row.request) if last else None))
            if out.finished:
                del self.rows[out.request_id]
        return events


def extra_args(transfer: dict | None) -> dict | None:
    """``SamplingParams.extra_args`` carrying a cartridge load to the connector (None: none)."""
    return {"kv_transfer_params": transfer} if transfer else None


def end_reason(output: Any, r: GenerationRequest) -> str:
    """Why a finished vLLM completion ended, as the engines report it: "eos" (it stopped on
    an end-of-sequence id: the only stop ids the engine passes) or "length"."""
    return "eos" if output.finish_reason == "stop" and not r.ignore_eos else "length"


def _shut_down(llm: Any, spool: str) -> None:
    shutdown = getattr(getattr(llm, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
    shutil.rmtree(spool, ignore_errors=True)


def topk_of(step: Any, k: int) -> TopK:
    """The k most likely candidates of one position's vLLM logprobs (which also hold the sampled
    token when it ranks below k)."""
    ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in step.items() if lp.rank <= k))
    return TopK([tid for _, tid, _ in ranked], [lp for _, _, lp in ranked])


def placeholder_id(tokenizer: Any) -> int:
    """The token that stands for cartridge positions in a vLLM prompt (its KV is overwritten)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

