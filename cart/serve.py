"""``cart serve``: an OpenAI-compatible HTTP server that answers with cartridges.

A request names a cartridge in ``model`` (its file name in ``--cartridges DIR`` without
``.safetensors``), or the base model for none, or lists several in ``cartridges`` to compose
them for that request. Every request is decoded by one continuous-batching scheduler
(``cart.scheduler``) over the engine's running batch: requests on different cartridges share
decode steps, and a cartridge's K/V is held once however many requests use it.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not),
``GET /v1/models`` (+ ``/v1/models/{id}``), ``GET /health``. Errors are OpenAI error objects.
"""

# No ``from __future__ import annotations``: FastAPI reads the route handlers' parameter types
# when they are registered. fastapi and uvicorn are imported here, at the top: only ``cart
# serve`` (after its arguments are parsed) and the tests import this module.
import asyncio
import copy
import functools
import hmac
import logging
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from cart.chat import render_cartridge_ids, render_ids
from cart.compose import compose_parts
from cart.config import check_type, flag
from cart.engines import check_runtime, get_engine, with_runtime
from cart.engines.base import Engine, GenerationRequest, KVPrefix
from cart.io import CartError, parse_size
from cart.openai_api import ChatCompletionRequest, CompletionRequest, error_body, validation_error
from cart.scheduler import Overloaded, Scheduler
from cart.store import CartridgeStore, Entry, UnknownCartridge

log = logging.getLogger("cart.serve")

COMPOSED_KEEP = 8  # request-time compositions kept ready (by their parts' names and hashes)


@dataclass
class ServeConfig:
    cartridges: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_tokens: int = 1024  # cap on a request's max_tokens (and the default when omitted)
    max_prompt_tokens: int = 0  # 0: the model's context
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 64  # requests running + waiting; more get 429
    max_batch: int = 32  # rows decoded together
    cache_bytes: int = 4 << 30  # cartridges kept in memory (LRU)
    shutdown_timeout: float = 120.0  # seconds in-flight requests get after SIGTERM
    request_timeout: float = 30.0  # seconds a client gets to send a request's headers, then its body
    engine: str = "auto"
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        for name in ("max_body_bytes", "cache_bytes"):  # "4GiB" from a flag or a config file
            if isinstance(getattr(self, name), str):
                setattr(self, name, parse_size(getattr(self, name), flag(name)))
        check_type("cartridges", self.cartridges, str)
        if not self.cartridges:
            raise CartError("--cartridges DIR is required (a directory of .safetensors cartridges)")
        check_type("host", self.host, str)
        if self.api_key is not None:
            check_type("api_key", self.api_key, str)
            if not self.api_key:
                raise CartError("--api-key (or CART_API_KEY) must not be empty")
        for name in ("port", "max_tokens", "max_prompt_tokens", "max_body_bytes", "max_concurrent",
                     "max_batch", "cache_bytes"):
            check_type(name, getattr(self, name), int)
        if not 0 <= self.port <= 65535:
            raise CartError(f"--port must be 0..65535, got {self.port}")
        for name in ("max_tokens", "max_body_bytes", "max_concurrent", "max_batch", "cache_bytes"):
            if getattr(self, name) < 1:
                raise CartError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens < 0:
            raise CartError(f"--max-prompt-tokens must be >= 0, got {self.max_prompt_tokens}")
        for name in ("shutdown_timeout", "request_timeout"):
            check_type(name, getattr(self, name), (int, float))
            if getattr(self, name) <= 0:  # (check_type refuses nan and inf)
                raise CartError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        check_runtime(self.engine, self.dtype)

    def public(self) -> dict[str, Any]:
        """The resolved config, with the API key hidden (it is logged and shown on /health
        to clients that give the key)."""
        out = asdict(self)
        out["api_key"] = "(set)" if self.api_key else None
        return out


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code


class TextStream:
    """Generated token ids -> text deltas: holds back an incomplete UTF-8 character and any
    tail that could be the start of a stop string; ends the text at the first stop string."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finished = False

    def push(self, token_id: int, eos: bool) -> tuple[str, bool]:
        """(new text that is safe to send, whether a stop string ended the text)."""
        if not eos:
            self.ids.append(token_id)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._send(len(self.text)), True
        safe = len(self.text.rstrip("\ufffd"))  # a multi-byte character still incomplete
        for s in self.stops:
            head = self.text[:safe]
            for k in range(min(len(s) - 1, safe), 0, -1):
                if head.endswith(s[:k]):
                    safe -= k
                    break
        return self._send(max(safe, self.sent)), False

    def flush(self) -> str:
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        delta = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return delta


class CartServer:
    """What the routes share: engine, store, scheduler and the request -> generation logic."""

    def __init__(self, cfg: ServeConfig, engine: Engine, store: CartridgeStore):
        self.cfg, self.engine, self.store = cfg, engine, store
        self.tokenizer = engine.tokenizer
        self.base = engine.identity.model_id
        self.context = engine.max_context
        self.max_prompt = cfg.max_prompt_tokens or self.context
        self.started = int(time.time())
        self.scheduler = Scheduler(engine, cfg.max_batch, cfg.max_concurrent)
        self._composed: OrderedDict[tuple, KVPrefix] = OrderedDict()
        self._lock = threading.Lock()  # resolve() runs on worker threads

    # -- cartridges --------------------------------------------------------------------------
    def _entry(self, name: str, param: str) -> Entry:
        try:
            return self.store.entry(name)
        except UnknownCartridge as e:
            raise APIError(404, f"{e}; GET /v1/models lists the cartridges", param=param,
                           code="model_not_found") from None

    def _prefix_of(self, entry: Entry) -> KVPrefix:
        """The entry's KVPrefix, made once: the engine keeps one converted copy per KVPrefix
        object, so every request on this cartridge shares it (until the file changes)."""
        with self._lock:
            if entry.kv_prefix is None:
                entry.kv_prefix = KVPrefix.of_cartridge(entry.cartridge, entry.sha256)
            return entry.kv_prefix

    def resolve(self, model: str, cartridges: list[str] | None) -> KVPrefix | None:
        """The KV prefix a request asks for (None: the bare base model)."""
        if cartridges:
            if model != self.base:
                raise APIError(400, f"with 'cartridges', 'model' must name the base model "
                                    f"({self.base!r}), got {model!r}", param="model")
            entries = [self._entry(n, "cartridges") for n in cartridges]
            if len(entries) == 1:
                return self._prefix_of(entries[0])
            key = tuple((e.name, e.sha256) for e in entries)
            with self._lock:
                kvp = self._composed.pop(key, None)
            if kvp is None:
                try:
                    cart = compose_parts([(e.name, e.cartridge, e.sha256) for e in entries])
                except CartError as e:
                    raise APIError(400, f"cannot compose {', '.join(cartridges)}: {e}",
                                   param="cartridges") from None
                kvp = KVPrefix.of_cartridge(cart, "+".join(f"{n}:{h}" for n, h in key))
            with self._lock:
                self._composed[key] = kvp
                while len(self._composed) > COMPOSED_KEEP:
                    self._composed.popitem(last=False)
            return kvp
        if model == self.base:
            return None
        return self._prefix_of(self._entry(model, "model"))

    def models(self) -> list[dict[str, Any]]:
        out = [{"id": self.base, "object": "model", "created": self.started, "owned_by": "cart"}]
        for entry in self.store.entries():
            cart = entry.cartridge
            out.append({"id": entry.name, "object": "model", "created": entry.stamp[1] // 1_000_000_000,
                        "owned_by": "cart", "root": self.base, "parent": self.base,
                        "cartridge": {"tokens": cart.num_tokens, "kv_bytes": entry.nbytes,
                                      "query_position": cart.query_position,
                                      "corpus_tokens": cart.metadata.get("corpus_tokens")}})
        return out

    # -- generation --------------------------------------------------------------------------
    def requests(self, prompts: list[list[int]], body: Any, max_tokens: int | None,
                 kv_prefix: KVPrefix | None, prompt_param: str) -> list[GenerationRequest]:
        """One GenerationRequest per choice (each prompt ``n`` times), within the limits."""
        first = kv_prefix.query_position if kv_prefix is not None else 0
        if max_tokens is not None and max_tokens > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's cap of "
                                f"{self.cfg.max_tokens}", param="max_tokens")
        out = []
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param=prompt_param)
            if len(ids) > self.max_prompt:
                raise APIError(400, f"the prompt is {len(ids)} tokens; this server takes at most "
                                    f"{self.max_prompt}", param=prompt_param, code="prompt_too_long")
            room = self.context - first - len(ids)
            want = max_tokens if max_tokens is not None else min(self.cfg.max_tokens, room)
            if want > room or room < 1:
                raise APIError(400, f"this model's context is {self.context} tokens: the cartridge's "
                                    f"{first} + the prompt's {len(ids)} + max_tokens {want} exceed "
                                    f"it", param="max_tokens", code="context_length_exceeded")
            for _ in range(body.n):
                out.append(GenerationRequest(ids, want, temperature=body.temperature if
                                             body.temperature is not None else 1.0,
                                             kv_prefix=kv_prefix, ignore_eos=body.ignore_eos))
        return out

    def generate(self, requests: list[GenerationRequest], stops: list[str], seed: int | None
                 ) -> AsyncIterator[tuple[int, str, str | None, int]]:
        """Submit every choice now (overload is an APIError here, before any response goes
        out); the returned iterator yields (choice index, text delta, finish reason or None,
        tokens so far)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets = []
        try:
            for i, r in enumerate(requests):
                # any client integer is a valid seed: fold it into the generator's 63 bits
                choice_seed = (seed + i) % (1 << 63) if seed is not None else secrets.randbits(62)
                tickets.append(self.scheduler.submit(
                    r, choice_seed,
                    lambda tok, done, reason, err, i=i: loop.call_soon_threadsafe(
                        events.put_nowait, (i, tok, done, reason, err))))
        except Overloaded as e:
            for t in tickets:
                self.scheduler.cancel(t)
            if e.status == 429:
                raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        return self._results(requests, tickets, events, stops)

    async def _results(self, requests, tickets, events, stops):
        texts = [TextStream(self.tokenizer, stops) for _ in requests]
        counts = [0] * len(requests)
        live = len(requests)
        try:
            while live:
                i, tok, done, reason, err = await events.get()
                text = texts[i]
                if text.finished:
                    continue
                if err is not None:
                    raise APIError(500, err, "server_error")
                counts[i] += 1
                delta, stopped = text.push(tok, eos=reason == "eos")
                finish = None
                if stopped:
                    self.scheduler.cancel(tickets[i])
                    finish = "stop"
                elif done:
                    delta += text.flush()
                    finish = "stop" if reason == "eos" else "length"
                if finish:
                    text.finished = True
                    live -= 1
                if delta or finish:
                    yield i, delta, finish, counts[i]
        finally:
            for t in tickets:
                self.scheduler.cancel(t)


class Completion:
    """One response of ``POST /v1/chat/completions`` (``kind`` "chat") or ``/v1/completions``
    ("text"). Every choice is submitted when it is made (``CartServer.generate``: overload is an
    APIError then, before any response goes out); ``respond`` then collects them into one body
    (``full``) or sends them as server-sent events while they are generated (``streamed``)."""

    def __init__(self, server: CartServer, kind: str, body: Any, prompts: list[list[int]],
                 kv_prefix: KVPrefix | None, max_tokens: int | None):
        requests = server.requests(prompts, body, max_tokens, kv_prefix,
                                   "messages" if kind == "chat" else "prompt")
        self.kind, self.body, self.n = kind, body, len(requests)
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.created = int(time.time())
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.results = server.generate(requests, body.stops(), body.seed)

    async def respond(self) -> Any:
        if not self.body.stream:
            return await self.full()
        return StreamingResponse(self.streamed(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def usage(self, completion: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    async def full(self) -> dict[str, Any]:
        texts, tokens = [""] * self.n, [0] * self.n
        finish: list[str | None] = [None] * self.n
        async for i, delta, reason, n in self.results:
            texts[i] += delta
            tokens[i] = n
            finish[i] = reason or finish[i]
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices,
                "usage": self.usage(sum(tokens))}

    def chunk_choice(self, i: int, text: str | None, finish: str | None, first: bool = False):
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

    async def streamed(self) -> AsyncIterator[bytes]:
        head = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else
                "text_completion", "created": self.created, "model": self.body.model}
        tokens = [0] * self.n
        if self.kind == "chat":
            yield _sse({**head, "choices": [self.chunk_choice(i, None, None, first=True)
                                            for i in range(self.n)]})
        try:
            async for i, delta, reason, n in self.results:
                tokens[i] = n
                yield _sse({**head, "choices": [self.chunk_choice(i, delta, reason)]})
        except APIError as e:
            yield _sse(error_body(str(e), e.type, e.param, e.code))
            return
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": self.usage(sum(tokens))})
        yield b"data: [DONE]\n\n"


def _sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# -- the routes: each finds the CartServer on the app (create_app) ------------------------------
router = APIRouter()


@router.get("/health")
async def health(request: Request):
    server: CartServer = request.app.state.server
    # without the key (when one is set): alive or not, and nothing about what is served
    if not key_ok(server.cfg.api_key, request.scope):
        return {"status": "ok"}
    running, waiting = server.scheduler.counts()
    st = server.scheduler.stats
    return {"status": "ok", "model": server.base, "running": running, "waiting": waiting,
            "cartridges_loaded": server.store.loaded_names(),
            "cartridges_loaded_bytes": server.store.loaded_bytes(),
            "kv_bytes": st.kv_bytes, "kv_bytes_peak": st.kv_bytes_peak,
            "batch_peak": st.batch_peak, "steps": st.steps,
            "tokens_generated": st.tokens, "requests": st.requests, "config": server.cfg.public()}


@router.get("/v1/models")
async def models(request: Request):
    data = await asyncio.to_thread(request.app.state.server.models)
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}")
async def model(model_id: str, request: Request):
    for m in await asyncio.to_thread(request.app.state.server.models):
        if m["id"] == model_id:
            return m
    raise APIError(404, f"no model or cartridge named {model_id!r}", param="model",
                   code="model_not_found")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    server: CartServer = request.app.state.server
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    kv_prefix = await asyncio.to_thread(server.resolve, body.model, body.cartridges)
    # a chat follows a cartridge as it follows the document in ICL
    render = render_ids if kv_prefix is None else render_cartridge_ids
    try:
        prompt = render(server.tokenizer, messages, add_generation_prompt=True)[0]
    except Exception as e:  # the model's own chat template refused the conversation
        raise APIError(400, f"the chat template rejected the messages: {e}",
                       param="messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await Completion(server, "chat", body, [prompt], kv_prefix, max_tokens).respond()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    server: CartServer = request.app.state.server
    prompts = [server.tokenizer(p).input_ids for p in body.prompts()]
    kv_prefix = await asyncio.to_thread(server.resolve, body.model, body.cartridges)
    return await Completion(server, "text", body, prompts, kv_prefix, body.max_tokens).respond()


async def _api_error(request: Request, e: APIError):
    return JSONResponse(error_body(str(e), e.type, e.param, e.code), status_code=e.status)


async def _invalid_request(request: Request, e: RequestValidationError):
    message, param = validation_error(e.errors())
    return JSONResponse(error_body(message, param=param), status_code=400)


async def _http_error(request: Request, e: HTTPException):
    code = "not_found" if e.status_code == 404 else None
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}",
                                   param=None, code=code), status_code=e.status_code)


async def _crash(request: Request, e: Exception):
    log.exception("request failed")
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                        status_code=500)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    # uvicorn has let in-flight requests finish; the scheduler drains what is left
    server: CartServer = app.state.server
    await asyncio.to_thread(server.scheduler.close, server.cfg.shutdown_timeout)


def create_app(server: CartServer):
    """The ASGI app serving ``server``: the routes, behind the ``Guard``."""
    app = FastAPI(title="cart serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan, exception_handlers={
                      APIError: _api_error, RequestValidationError: _invalid_request,
                      HTTPException: _http_error, Exception: _crash})
    app.state.server = server
    app.include_router(router)
    cfg = server.cfg
    return Guard(app, cfg.api_key, cfg.max_body_bytes, cfg.request_timeout)


def key_ok(api_key: str | None, scope: dict) -> bool:
    """Whether the request may pass: no key is set, or it gives ``Authorization: Bearer KEY``
    (compared in constant time)."""
    if not api_key:
        return True
    given = dict(scope.get("headers") or []).get(b"authorization", b"")
    return hmac.compare_digest(given, b"Bearer " + api_key.encode())


class Guard:
    """ASGI middleware in front of the app: the Bearer API key on /v1, the body-size cap and
    the body's deadline (read in full before the app sees it), and the client's disconnect,
    which cancels the request (its generation stops, streamed or not)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 request_timeout: float = 30.0):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.timeout = request_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v1") and not key_ok(self.api_key, scope):
            return await _send_error(send, 401, "missing or invalid API key (Authorization: "
                                                "Bearer KEY)", code="invalid_api_key")
        body = await self._body(scope, receive, send)
        if body is not None:
            await _until_disconnect(self.app, scope, body, receive, send)

    async def _body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None when the client left or was answered with an error."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        body, late = bytearray(), False
        try:
            async with asyncio.timeout(self.timeout):  # a slow (or stalled) sender
                while not too_big:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    too_big = len(body) > self.max_body
                    if not too_big and not message.get("more_body"):
                        return bytes(body)
        except TimeoutError:
            late = True
        if late:
            await _send_error(send, 408, f"the request body did not arrive within "
                                         f"{self.timeout:g} s (--request-timeout)",
                              code="request_timeout", close=True)
        else:
            await _send_error(send, 413, f"request body over {self.max_body} bytes "
                                         f"(--max-body-bytes)", code="request_too_large")
        return None


async def _until_disconnect(app: Any, scope: dict, body: bytes, receive, send) -> None:
    """Run ``app`` on a request whose ``body`` was read; if the client goes away before the
    response is complete, cancel it. Starlette notices a disconnect only while it streams: a
    non-streamed request would go on generating for nobody and hold its place in
    --max-concurrent (the cancelled request's tickets are cancelled on its way out)."""
    gone = asyncio.Event()
    complete = False
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def sending(message):
        nonlocal complete
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete = True
        await send(message)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        if not complete:
            task.cancel()

    task = asyncio.ensure_future(app(scope, replay, sending))
    watcher = asyncio.ensure_future(watch())
    try:
        await task
    except asyncio.CancelledError:
        if not gone.is_set() or asyncio.current_task().cancelling():
            raise  # cancelled from outside (shutdown), not by the client leaving
    finally:
        watcher.cancel()


async def _send_error(send, status: int, message: str, code: str | None = None,
                      close: bool = False):
    data = orjson.dumps(error_body(message, "invalid_request_error", None, code))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the rest of the request may still come: this connection is done
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class TimedProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, closing a connection that has not sent a whole request line
    and headers within ``request_timeout`` seconds of opening, or of its previous response.
    uvicorn waits for them forever: idle and half-sent connections would pile up (slowloris)."""

    _timer = None
    _partial = False

    def __init__(self, *args, request_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def data_received(self, data):
        self._partial = True
        super().data_received(data)

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self._timer is not None:
            self._timer.cancel()
        self._partial = False
        waiting_for = self.cycle  # a new request replaces it once its headers are in
        self._timer = self.loop.call_later(self.request_timeout, self._expire, waiting_for)

    def _expire(self, waiting_for):
        self._timer = None
        if (self.cycle is not waiting_for or self.transport.is_closing()
                or (self.cycle is not None and not self.cycle.response_complete)):
            return  # a request came (or one is still being answered)
        if self._partial:  # a request was begun: say why it ends (an idle one just closes)
            self.transport.write(_timeout_response(self.request_timeout))
        self.transport.close()


def _timeout_response(timeout: float) -> bytes:
    data = orjson.dumps(error_body(f"the request headers did not arrive within {timeout:g} s "
                                   f"(--request-timeout)", code="request_timeout"))
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(data)) + data


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a busy port is a one-line error and port 0 gets a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig, model: str | None, quiet: bool = False, console: Any = None) -> None:
    from cart.models import resolve_device

    from pathlib import Path

    from cart.cartridge import has_biases

    # compacted cartridges carry biases vLLM cannot apply: auto serves them with transformers
    files = Path(cfg.cartridges).glob("*.safetensors") if cfg.cartridges else ()
    cfg = with_runtime(cfg, biases=any(has_biases(f) for f in files))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cart serve: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    store = CartridgeStore(cfg.cartridges, None, cfg.cache_bytes)  # checks the directory first
    sock = _listen(cfg.host, cfg.port)
    engine = get_engine(cfg.engine, model, dtype=cfg.dtype, device=resolve_device(cfg.device),
                        console=console)
    store.identity = engine.identity
    server = CartServer(cfg, engine, store)
    names = store.names()  # load (and check) what is there now; later files come on demand
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.warning("http://%s:%d/v1 -- model %s, %d cartridge(s) in %s%s", shown, port, server.base,
                len(names), cfg.cartridges, ", API key required" if cfg.api_key else "")
    log.info("config %s", {k: v for k, v in cfg.public().items()})
    config = uvicorn.Config(create_app(server), log_level="warning" if quiet else "info",
                            http=functools.partial(TimedProtocol, request_timeout=cfg.request_timeout),
                            timeout_graceful_shutdown=cfg.shutdown_timeout, lifespan="on",
                            access_log=not quiet, log_config=_stderr_log_config())
    try:
        GracefulServer(config).run(sockets=[sock])
    finally:
        close = getattr(engine, "close", None)  # vLLM: stop its engine process now
        if close is not None:
            close()


def _stderr_log_config() -> dict:
    """uvicorn's logging, with its request log moved from stdout to stderr (stdout carries
    data only, as for every cart command)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    return config


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a graceful stop (SIGTERM, or a first Ctrl-C) ends the
    process with status 0 once the requests in flight are done, instead of re-raising the
    signal; a second Ctrl-C still forces the exit."""

    def handle_exit(self, sig, frame):
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        elif not self.should_exit:
            log.warning("%s: no new connections; finishing the requests in flight",
                        signal.Signals(sig).name)
            self.should_exit = True
