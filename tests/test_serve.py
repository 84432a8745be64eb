"""cart serve: a real server process on a free port, driven with the official openai client.

The tiny model here has a wide weight init (0.3) so greedy answers differ from prompt to
prompt: equality between batched and lone answers then means something.
"""

import asyncio
import shutil
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from conftest import VLLM, one_line_error

from serving import KEY, Server, write_cartridges
from tiny import build_tiny_model

QUESTIONS = ["Where do ships dock?", "Who founded the cooperative?", "How many bridges?",
             "What is the answer?", "Name a number.", "Which tram line?", "When was 2091?",
             "Say something about the fox."]


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("peaked") / "model", seed=3, init_range=0.3,
                            head_dim=32)  # vLLM serves it too


@pytest.fixture(scope="module")
def carts(peaked_model, tmp_path_factory) -> Path:
    """alpha/beta/gamma: cartridges of 8, 12 and 16 tokens from different parts of the text."""
    d = tmp_path_factory.mktemp("carts")
    write_cartridges(peaked_model, d, {name: (i * 10, i * 10 + 8 + 4 * i)
                                       for i, name in enumerate(("alpha", "beta", "gamma"))})
    return d


# the engines every server test runs on
ENGINES = ["transformers", pytest.param("vllm", marks=VLLM)]


@pytest.fixture(scope="module", params=ENGINES)
def server(request, peaked_model, carts, cart_home, tmp_path_factory):
    s = Server(peaked_model, carts, cart_home, tmp_path_factory.mktemp("log") / "serve.log",
               "--engine", request.param)
    yield s
    assert s.stop() == 0
    assert s.stdout.read_bytes() == b""  # stdout carries data only: the request log is on stderr
    assert "POST /v1/chat/completions" in s.log.read_text()


def ask(client, model, question, max_tokens=12, **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].message.content


def test_chat_streaming_and_not_agree(server):
    c = server.client()
    r = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                  max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "alpha"
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    text = r.choices[0].message.content
    assert text
    stream = c.chat.completions.create(model="alpha", stream=True, temperature=0, max_tokens=12,
                                       messages=[{"role": "user", "content": QUESTIONS[0]}],
                                       stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == text
    assert finish == r.choices[0].finish_reason and usage.completion_tokens == r.usage.completion_tokens
    # the cartridge matters: another cartridge, or none, answers differently
    answers = {ask(c, m, QUESTIONS[0]) for m in ("alpha", "beta", "gamma", server_base(c))}
    assert len(answers) >= 3


def server_base(client) -> str:
    return client.models.list().data[0].id


def test_models_list(server):
    c = server.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == ["model", "alpha", "beta", "gamma"]
    alpha = c.models.retrieve("alpha")
    assert alpha.cartridge["tokens"] == 8 and alpha.owned_by == "cart"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_completions_compose_and_hot_pickup(server, carts, run_cart):
    c = server.client()
    r = c.completions.create(model="model", prompt="Orbital freight", max_tokens=10, temperature=0,
                             extra_body={"cartridges": ["alpha", "beta"]})
    assert r.object == "text_completion" and r.usage.completion_tokens >= 1
    composed = r.choices[0].text
    # the same composition written by `cart compose` and dropped in the directory: picked up
    # without a restart, and it answers exactly as the request-time composition
    out = carts / "alphabeta.safetensors"
    proc = run_cart("compose", carts / "alpha.safetensors", carts / "beta.safetensors", "-o", out)
    assert proc.returncode == 0, proc.stderr
    try:
        assert "alphabeta" in [m.id for m in c.models.list().data]
        r2 = c.completions.create(model="alphabeta", prompt="Orbital freight", max_tokens=10, temperature=0)
        assert r2.choices[0].text == composed
        plain = c.completions.create(model="alpha", prompt="Orbital freight", max_tokens=10, temperature=0)
        assert plain.choices[0].text != composed
        # several prompts and n: choice i*n + j
        many = c.completions.create(model="alpha", prompt=["Orbital freight", "Meridian"], n=2,
                                    max_tokens=6, temperature=0)
        texts = [ch.text for ch in sorted(many.choices, key=lambda ch: ch.index)]
        assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3]
    finally:
        out.unlink()
    assert "alphabeta" not in [m.id for m in c.models.list().data]


def test_stop_sequences(server):
    c = server.client()
    full = ask(c, "beta", QUESTIONS[1], max_tokens=16)
    cut = full[3:5]
    assert cut.strip(), full
    r = c.chat.completions.create(model="beta", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                  max_tokens=16, temperature=0, stop=[cut])
    assert r.choices[0].message.content == full[:full.index(cut)]
    assert r.choices[0].finish_reason == "stop"
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=16,
        temperature=0, stop=cut, stream=True) if ch.choices]
    assert "".join(pieces) == full[:full.index(cut)]


def test_errors_are_openai_errors(server, carts):
    c = server.client()
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").chat.completions.create(model="alpha", messages=msg)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
    for name in ("nope", "../alpha", "alpha.safetensors", "/etc/passwd"):
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model=name, messages=msg)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    bad = [({"top_p": 0.5}, "top_p"), ({"extra_body": {"colour": "red"}}, "colour"),
           ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**6}, "max_tokens"),
           ({"temperature": "hot"}, "temperature"), ({"n": 99}, "n"),
           ({"logprobs": True}, "logprobs"), ({"extra_body": {"cartridges": ["alpha"]}}, "model")]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="alpha", messages=msg, **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="alpha", messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as e:  # cartridge + prompt + max_tokens > context
        c.completions.create(model="gamma", prompt="fox " * 3300, max_tokens=1024)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "alpha", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    # a corrupt cartridge is refused with its reason, logged, and the server carries on
    (carts / "broken.safetensors").write_bytes(b"\x00" * 64)
    try:
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="broken", messages=msg)
        assert "unusable" in e.value.body["message"]
        assert "broken" not in [m.id for m in c.models.list().data]
        assert ask(c, "alpha", "hi")
    finally:
        (carts / "broken.safetensors").unlink()
    assert "rejected cartridge broken" in server.log.read_text()


def test_concurrent_requests_over_three_cartridges_equal_each_alone(server):
    """32 simultaneous greedy requests over 3 cartridges (and different prompts and lengths)
    decode in shared steps; every answer equals the same request served alone."""
    jobs = [(("alpha", "beta", "gamma")[i % 3], QUESTIONS[i % len(QUESTIONS)], 6 + i % 7)
            for i in range(32)]
    alone = [ask(server.client(), m, q, n) for m, q, n in jobs]
    before = server.health()

    async def together():
        client = server.client(cls=AsyncOpenAI)
        rs = await asyncio.gather(*(client.chat.completions.create(
            model=m, messages=[{"role": "user", "content": q}], max_tokens=n, temperature=0)
            for m, q, n in jobs))
        return [r.choices[0].message.content for r in rs]

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 8  # the answers are not all alike
    assert server.health()["batch_peak"] > before["batch_peak"] >= 1  # they really shared steps


def _log(tmp_path):
    return tmp_path / "serve.log"


@pytest.mark.parametrize("engine", ENGINES)
def test_overload_is_429_and_sigterm_lets_requests_finish(engine, peaked_model, carts, cart_home, tmp_path):
    s = Server(peaked_model, carts, cart_home, _log(tmp_path), "--max-concurrent", "2",
               "--max-batch", "1", "-q", "--engine", engine)
    try:
        async def flood():
            client = s.client(cls=AsyncOpenAI)
            return await asyncio.gather(*(client.chat.completions.create(
                model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=60,
                temperature=0, extra_body={"ignore_eos": True}) for _ in range(6)),
                return_exceptions=True)

        results = asyncio.run(flood())
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        done = [r for r in results if not isinstance(r, Exception)]
        assert refused and done and len(refused) + len(done) == 6
        assert all(r.usage.completion_tokens == 60 for r in done)

        # SIGTERM during a stream: the stream still ends whole, then the process exits 0
        stream = s.client().chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "x"}], max_tokens=300,
            temperature=0, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        s.proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].usage.completion_tokens == 300
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert s.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")
    finally:
        s.stop()


def test_bad_arguments_are_one_line_errors(run_cart, tmp_path, peaked_model, carts):
    err = one_line_error(run_cart("serve", "--cartridges", tmp_path / "none", "-m", peaked_model))
    assert err == f"cart: error: {tmp_path / 'none'}: not a directory of cartridges"
    err = one_line_error(run_cart("serve", "-m", peaked_model))
    assert err == "cart: error: --cartridges DIR is required (a directory of .safetensors cartridges)"
    err = one_line_error(run_cart("serve", "--cartridges", carts, "--max-batch", "0"))
    assert err == "cart: error: --max-batch must be >= 1, got 0"
    err = one_line_error(run_cart("serve", "--cartridges", carts, "--cache-bytes", "lots"))
    assert err == "cart: error: --cache-bytes must be a size such as 1048576, 512MiB or 4GiB, got 'lots'"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(run_cart("serve", "--cartridges", carts, "-m", peaked_model,
                                      "--port", port))
    assert err.startswith(f"cart: error: cannot listen on 127.0.0.1:{port}: ")


# -- issue 15: hardening ------------------------------------------------------------------------
def test_health_without_the_key_says_only_ok(server, carts):
    """With a key set, /health gave anyone the cartridge names and the store's absolute path."""
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(server.url + "/health", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ok"}
    details = server.health()
    assert details["status"] == "ok" and details["running"] == 0
    assert details["config"]["cartridges"] == str(carts) and details["config"]["api_key"] == "(set)"


def test_empty_api_key_is_refused_from_the_environment_too(run_cart, carts, peaked_model):
    """`CART_API_KEY=` silently turned auth off while `--api-key ""` was refused."""
    want = "cart: error: --api-key (or CART_API_KEY) must not be empty"
    assert one_line_error(run_cart("serve", "--cartridges", carts, "-m", peaked_model,
                                   "--api-key", "")) == want
    assert one_line_error(run_cart("serve", "--cartridges", carts, "-m", peaked_model,
                                   env={"CART_API_KEY": ""})) == want


def test_long_stop_strings_are_refused(server):
    c = server.client()
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="alpha", messages=msg, stop=["ok", "x" * 257])
    assert e.value.body == {"message": "stop: stop sequences must be at most 256 characters",
                            "type": "invalid_request_error", "param": "stop", "code": None}
    r = c.chat.completions.create(model="alpha", messages=msg, stop="x" * 256, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_adversarial_temperatures_do_not_sink_the_batch(server):
    """temperature 1e-40 (or 5e-324) made the decode step raise, and every request sharing it
    got a 500; now each is the greedy answer, and the others are unaffected."""
    want = ask(server.client(), "alpha", QUESTIONS[0], max_tokens=8)

    async def together():
        client = server.client(cls=AsyncOpenAI)
        return await asyncio.gather(*(client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=8,
            temperature=t, seed=1) for t in (0, 1e-40, 5e-324, 1e-300, 0, 2)))

    answers = [r.choices[0].message.content for r in asyncio.run(together())]
    assert answers[:5] == [want] * 5


def test_store_changes_while_serving(server, carts):
    """A crafted header dropped in made /v1/models 500 for everyone; a deleted cartridge stayed
    in /health until a request named it."""
    c = server.client()
    (carts / "crafted.safetensors").write_bytes(struct.pack("<Q", 24) + b'{"__metadata__": [1, 2]}')
    try:
        assert [m.id for m in c.models.list().data] == ["model", "alpha", "beta", "gamma"]
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="crafted", messages=[{"role": "user", "content": "x"}])
        assert e.value.body["message"].startswith("cartridge 'crafted' is unusable: ")
    finally:
        (carts / "crafted.safetensors").unlink()
    assert "rejected cartridge crafted: " in server.log.read_text()
    shutil.copy(carts / "alpha.safetensors", carts / "delta.safetensors")
    try:
        ask(c, "delta", "hi", max_tokens=2)
        assert "delta" in server.health()["cartridges_loaded"]
    finally:
        (carts / "delta.safetensors").unlink()
    assert "delta" not in server.health()["cartridges_loaded"]


def test_abandoned_and_stalled_requests_free_their_place(peaked_model, carts, cart_home, tmp_path):
    """Non-streamed requests whose clients left kept generating (and holding --max-concurrent:
    429 for everyone else); a client that sends half a request held its connection forever."""
    s = Server(peaked_model, carts, cart_home, _log(tmp_path), "--max-concurrent", "2",
               "--max-tokens", "4000", "--request-timeout", "1", "-q")
    try:
        def abandon():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/completions", timeout=1.5, headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "alpha", "prompt": "x", "max_tokens": 4000, "ignore_eos": True})

        threads = [threading.Thread(target=abandon) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.time() + 5
        while s.health()["running"] + s.health()["waiting"] and time.time() < deadline:
            time.sleep(0.1)
        assert s.health()["running"] == 0 and s.health()["waiting"] == 0
        assert ask(s.client(), "alpha", "hi", max_tokens=2)  # not 429

        # half the headers, then nothing: a 408 after --request-timeout, and the connection closes
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            reply = _read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408 ") and reply.endswith(
            b'{"error":{"message":"the request headers did not arrive within 1 s (--request-timeout)",'
            b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}')
        # the headers, and half the body
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
            reply = _read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408 ") and reply.endswith(
            b'{"error":{"message":"the request body did not arrive within 1 s (--request-timeout)",'
            b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}')
        # an idle connection is closed too (silently: no request was begun)
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            assert _read_all(sock) == b""
        assert s.health()["running"] == 0
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.log.read_text()


def _read_all(sock) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out
