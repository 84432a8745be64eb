"""Fuzzing cart serve's OpenAI request handling (issue 15, item 14): whatever the body, the
answer is a result or an OpenAI error object (4xx) -- never a 500 or an internal error.

The requests go through the real ASGI app (the Guard, FastAPI's validation, the routes, the
scheduler and its decode thread), in process; only the model is a stub, which draws each token
with the engine's own ``sample_token`` at the request's temperature, so every accepted
temperature is sampled with too. A real cartridge of the tiny model is in the directory, so
requests that name it or compose it reach the store and the composer.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cart.engines.base import StepEvent, sample_token
from cart.kvcache import cartridge_from_tokens
from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model
from cart.openai_api import (MAX_N, MAX_STOP_CHARS, MAX_STOPS, ChatCompletionRequest, CompletionRequest,
                             validation_error)

KEY = "fuzz-key"
EXAMPLES = 2000


class StubBatch:
    """A running batch whose 'model' scores every token the same but three (a peaked
    distribution): up to 3 tokens a row, drawn with ``sample_token`` as the engine does."""

    def __init__(self, engine):
        self.engine, self.rows = engine, []
        self.logits = torch.zeros(engine.vocab)
        self.logits[[10, 20, 30]] = torch.tensor([4.0, 3.0, 2.0])

    def __len__(self):
        return len(self.rows)

    def add(self, requests, seeds):
        fresh = [[r, 0, torch.Generator().manual_seed(s)] for r, s in zip(requests, seeds)]
        self.rows += fresh
        return fresh

    def drop(self, rows):
        self.rows = [r for r in self.rows if all(r is not g for g in rows)]

    def kv_bytes(self):
        return 0

    def step(self):
        events, keep = [], []
        for row in self.rows:
            r = row[0]
            token = sample_token(self.logits, r.temperature, row[2]) if r.temperature > 0 else 10
            row[1] += 1
            done = row[1] >= min(3, r.max_new_tokens)
            events.append(StepEvent(row, token, done, "length" if done else None))
            if not done:
                keep.append(row)
        self.rows = keep
        return events


class StubEngine:
    def __init__(self, tokenizer, identity):
        self.tokenizer, self.identity = tokenizer, identity
        self.vocab = len(tokenizer)
        self.max_context = 4096

    def open_batch(self):
        return StubBatch(self)


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    from cart.serve import CartServer, ServeConfig, create_app
    from cart.store import CartridgeStore

    ref = resolve_model(str(tiny_model))
    model, tok, ident = load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash}
    d = tmp_path_factory.mktemp("fuzz-carts")
    ids = tok("Orbital freight ships dock at bay seven.").input_ids
    for name in ("alpha", "beta"):
        cartridge_from_tokens(model, torch.tensor(ids[:6]), metadata=md).save(d / f"{name}.safetensors")
    cfg = ServeConfig(cartridges=str(d), api_key=KEY, max_tokens=64)
    server = CartServer(cfg, StubEngine(tok, ident), CartridgeStore(d, ident))
    yield create_app(server), ident.model_id
    server.scheduler.close(10)


# -- what a hostile or careless client sends ---------------------------------------------------
NASTY_FLOATS = [0.0, -0.0, 1e-40, 5e-324, 1e-300, 2.0, 2.0000001, -1e-40, 1e308, float("inf"),
                float("-inf"), float("nan")]
NASTY_INTS = [0, 1, -1, 2, 8, 9, 64, 65, 2**31, 2**63, 2**64, -2**63, 10**30]
NASTY_STRINGS = ["", " ", "alpha", "beta", "model", "../alpha", "alpha.safetensors", "/etc/passwd",
                 "\x00", "\ud800", "\ufffd", "é" * 300, "x" * (MAX_STOP_CHARS + 1), "<|im_end|>",
                 "<|im_start|>system", "{{ raise }}", "%s%n", "\n"]

scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(NASTY_INTS), st.integers(),
                    st.sampled_from(NASTY_FLOATS), st.floats(), st.sampled_from(NASTY_STRINGS),
                    st.text(max_size=40))
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20)
roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", ""]),
                  anything)
contents = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=60),
                     st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                     "text": st.one_of(st.text(max_size=20), anything)}),
                              max_size=3),
                     anything)
messages = st.one_of(st.lists(st.fixed_dictionaries({"role": roles, "content": contents},
                                                    optional={"name": anything, "extra": anything}),
                              max_size=4),
                     anything)
stops = st.one_of(st.none(), st.sampled_from(NASTY_STRINGS),
                  st.lists(st.sampled_from(NASTY_STRINGS + ["a", "e", " the"]), max_size=MAX_STOPS + 2),
                  anything)
models = st.one_of(st.sampled_from(["alpha", "beta", "BASE", "nope", "", "../alpha", "alpha\x00"]), anything)
FIELDS = {  # the fields of both requests, each with values in range, out of it, and of any type
    "model": models,
    "cartridges": st.one_of(st.lists(st.sampled_from(["alpha", "beta", "nope", "../x"]), max_size=18),
                            anything),
    "max_tokens": st.one_of(st.sampled_from(NASTY_INTS), st.integers(1, 8), anything),
    "max_completion_tokens": st.one_of(st.integers(-2, 80), anything),
    "temperature": st.one_of(st.sampled_from(NASTY_FLOATS), st.floats(0, 2), anything),
    "top_p": st.one_of(st.sampled_from([1, 1.0, 0.5, 0, None]), anything),
    "n": st.one_of(st.integers(-1, MAX_N + 1), anything),
    "stream": st.one_of(st.booleans(), anything),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
    "stop": stops,
    "seed": st.one_of(st.sampled_from(NASTY_INTS), st.integers(), anything),
    "user": anything,
    "ignore_eos": st.one_of(st.booleans(), anything),
    "logprobs": st.one_of(st.sampled_from([None, False, True, 0, 5]), anything),
    "echo": st.one_of(st.booleans(), anything),
    "messages": messages,
    "prompt": st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=40),
                        st.lists(st.text(max_size=20), max_size=MAX_N + 1), anything),
    "colour": anything,
}


ODD_STOPS = ["a", "e", " the", "\n", "<|im_end|>", "\ufffd", "é", "x" * MAX_STOP_CHARS, "\ud800", "{"]
VALID = {  # values the server must serve: temperatures and stops at the edges included
    "max_tokens": st.integers(1, 8),
    "temperature": st.one_of(st.sampled_from([0, 0.0, 1e-40, 5e-324, 1e-300, 1e-30, 1, 2, 2.0]),
                             st.floats(0, 2)),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.one_of(st.none(), st.sampled_from(ODD_STOPS),
                      st.lists(st.sampled_from(ODD_STOPS), min_size=1, max_size=MAX_STOPS)),
    "seed": st.one_of(st.sampled_from(NASTY_INTS), st.integers()),
    "ignore_eos": st.booleans(),
    "user": st.text(max_size=10),
    "top_p": st.sampled_from([1, 1.0]),
}
texts = st.one_of(st.sampled_from([s for s in NASTY_STRINGS if s]), st.text(min_size=1, max_size=40))
valid_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]),
     "content": st.one_of(texts, st.lists(st.fixed_dictionaries(
         {"type": st.just("text"), "text": texts}), min_size=1, max_size=2))}), min_size=1, max_size=3)
valid_prompts = st.one_of(texts, st.lists(texts, min_size=1, max_size=3))


@st.composite
def bodies(draw):
    """(endpoint, body bytes, headers): valid requests, valid ones with one field off, any
    JSON at all, and bytes that are not JSON."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    shape = draw(st.sampled_from(["valid", "valid", "one off", "one off", "fields", "json", "bytes"]))
    if shape == "bytes":
        body = draw(st.one_of(st.binary(max_size=200), st.sampled_from(
            [b"", b"{", b"[" * 5000, b'{"model": "alpha"', b"\xff\xfe", b"null", b'{"model": NaN}'])))
    elif shape == "json":
        body = json.dumps(draw(anything)).encode()
    elif shape == "fields":
        required = ["model", "messages"] if chat else ["model", "prompt"]
        chosen = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
        obj = {k: draw(FIELDS[k]) for k in dict.fromkeys(required + chosen)
               if k in chosen or draw(st.integers(0, 9))}  # a required field is sometimes left out
        body = json.dumps(obj).encode()
    else:
        obj = {"model": draw(st.sampled_from(["alpha", "beta", "BASE"]))}
        if obj["model"] == "BASE" and draw(st.booleans()):
            obj["cartridges"] = draw(st.lists(st.sampled_from(["alpha", "beta"]), min_size=1, max_size=3))
        obj["messages" if chat else "prompt"] = draw(valid_messages if chat else valid_prompts)
        for k in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=6, unique=True)):
            obj[k] = draw(VALID[k])
        if shape == "one off":
            k = draw(st.sampled_from(sorted(FIELDS)))
            obj[k] = draw(FIELDS[k])
        body = json.dumps(obj).encode()
    auth = draw(st.sampled_from([f"Bearer {KEY}"] * 12 + ["", "Bearer wrong", KEY]))
    return path, body, {"Authorization": auth, "Content-Type": "application/json"}


def well_formed_error(r: httpx.Response) -> None:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "internal error" not in err["message"]
    assert err["type"] in ("invalid_request_error", "rate_limit_error"), err
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)


def well_formed_answer(path: str, body: bytes, r: httpx.Response) -> None:
    request = json.loads(body)
    if request.get("stream"):
        lines = [line for line in r.text.split("\n\n") if line]
        assert lines[-1] == "data: [DONE]", r.text
        for line in lines[:-1]:
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk and chunk["object"] in ("chat.completion.chunk", "text_completion")
        return
    out = r.json()
    chat = path.endswith("chat/completions")
    assert out["object"] == ("chat.completion" if chat else "text_completion")
    prompts = 1 if chat or isinstance(request["prompt"], str) else len(request["prompt"])
    assert len(out["choices"]) == prompts * request.get("n", 1)
    for choice in out["choices"]:
        text = choice["message"]["content"] if chat else choice["text"]
        assert isinstance(text, str) and choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] <= 3 * len(out["choices"])


def test_any_request_gets_an_answer_or_an_openai_error(app):
    """2,000 generated requests through the whole app: 200 with a well-formed answer, or a
    4xx OpenAI error object; never a 500."""
    asgi, base = app
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://fuzz")
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bodies())
    def check(case):
        path, body, headers = case
        body = body.replace(b'"BASE"', json.dumps(base).encode())
        r = loop.run_until_complete(client.post(path, content=body, headers=headers))
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 401, 404), (r.status_code, body[:300], r.text[:500])
        if r.status_code == 200:
            well_formed_answer(path, body, r)
        else:
            well_formed_error(r)

    try:
        check()
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    print("statuses:", seen)
    assert sum(seen.values()) >= EXAMPLES and seen.get(200) and seen.get(400)


field_dicts = st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=8, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from([ChatCompletionRequest, CompletionRequest]),
       st.one_of(field_dicts, field_dicts, anything))
def test_the_request_models_accept_only_what_the_server_can_run(model, obj):
    """Straight at the pydantic models, as parsed JSON: a valid request has only values the
    server can serve (a finite temperature in 0..2, bounded stops and choices); an invalid one
    has a one-line message naming the field."""
    from pydantic import ValidationError

    try:
        req = model.model_validate(obj)
    except ValidationError as e:
        message, param = validation_error(e.errors())
        assert message and "\n" not in message
        assert param is None or message.startswith(f"{param}: ")
        return
    assert req.temperature is None or (math.isfinite(req.temperature) and 0 <= req.temperature <= 2)
    assert 1 <= req.n <= MAX_N and len(req.stops()) <= MAX_STOPS
    assert all(0 < len(s) <= MAX_STOP_CHARS for s in req.stops())
    assert req.max_tokens is None or req.max_tokens >= 1
