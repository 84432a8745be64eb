"""A load test of a real `cart serve` (tiny model) through the openai client (issue 15): 200
concurrent mixed requests -- streamed and not, chat and completions, three cartridges, the base
model and compositions, adversarial temperatures and stop strings -- with 10% of the clients
leaving early. Every request that stays gets a well-formed answer, nothing is a 500, and the
server's running count is back to 0 within 5 s of the clients leaving.

A crafted cartridge header and a symlink out of the directory sit in the store from the start:
the server starts, skips them with a warning, and serves the rest.
"""

import asyncio
import os
import random
import struct
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from serving import KEY, Server, write_cartridges

CLIENTS = 200
LEAVING = CLIENTS // 10
CARTS = ("alpha", "beta", "gamma")
TEMPERATURES = [0, 1e-40, 5e-324, 1e-300, 0.5, 1, 2]
STOPS = [None, "e", ["\n", " the"], "x" * 256, "<|im_end|>", ["é", "\ufffd", "a", "."]]


@pytest.fixture(scope="module")
def carts(tiny_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("load-carts")
    write_cartridges(tiny_model, d, {name: (i * 8, i * 8 + 6 + 2 * i) for i, name in enumerate(CARTS)})
    header = b'{"__metadata__": "crafted"}'
    (d / "crafted.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    write_cartridges(tiny_model, d.parent, {"outside": (0, 4)})
    os.symlink(d.parent / "outside.safetensors", d / "outside.safetensors")
    return d


def request(i: int, rng: random.Random, base: str) -> dict:
    """Client i's request: its endpoint and keyword arguments."""
    chat = rng.random() < 0.6
    model = rng.choice([*CARTS, base, "composed"])
    kw = {"model": model, "max_tokens": rng.randint(2, 8), "temperature": rng.choice(TEMPERATURES),
          "stop": rng.choice(STOPS), "n": rng.choice([1, 1, 2]), "stream": rng.random() < 0.5,
          "seed": rng.choice([None, i, -i, 2**70])}
    if model == "composed":
        kw["model"], kw["extra_body"] = base, {"cartridges": rng.sample(CARTS, 2)}
    if chat:
        kw["messages"] = [{"role": "user", "content": rng.choice(["Where do ships dock?", "Hi", "é" * 5])}]
    else:
        kw["prompt"] = rng.choice(["Orbital freight", ["Meridian", "The fox"], "\x00"])
    if kw["stream"]:
        kw["stream_options"] = {"include_usage": True}
    return kw


async def answer(client: AsyncOpenAI, kw: dict) -> str:
    """Run one request to the end; 'ok' if the answer is well formed."""
    chat = "messages" in kw
    api = client.chat.completions if chat else client.completions
    choices = kw["n"] * (len(kw["prompt"]) if isinstance(kw.get("prompt"), list) else 1)
    if not kw["stream"]:
        r = await api.create(**kw)
        assert len(r.choices) == choices and r.usage.completion_tokens >= 0
        for c in r.choices:
            assert isinstance(c.message.content if chat else c.text, str)
            assert c.finish_reason in ("stop", "length")
        return "ok"
    finished, usage = {}, None
    async for chunk in await api.create(**kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert sorted(finished) == list(range(choices)) and set(finished.values()) <= {"stop", "length"}
    assert usage is not None
    return "ok"


async def leave(url: str, kw: dict) -> str:
    """A client that goes away early: a long generation, dropped after its first chunk (stream)
    or after 2 s (not streamed: by then the server has it, under load too)."""
    kw = {**kw, "max_tokens": 2000, "extra_body": {**kw.get("extra_body", {}), "ignore_eos": True}}
    kw.pop("stop")
    client = AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    api = client.chat.completions if "messages" in kw else client.completions
    try:
        if kw["stream"]:
            stream = await api.create(**kw)
            async for _ in stream:
                break
            await stream.close()
        else:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(api.create(**kw), 2)
    finally:
        await client.close()
    return "left"


def test_200_concurrent_mixed_requests(tiny_model, carts, cart_home, tmp_path):
    # one torch thread: the tiny model gains nothing from more, and on a busy CI machine
    # spinning OpenMP threads make every step tens of times slower
    s = Server(tiny_model, carts, cart_home, tmp_path / "serve.log", "--max-concurrent", "512",
               "--max-tokens", "3000", "-q", env={"OMP_NUM_THREADS": "1"})
    try:
        base = s.client().models.list().data[0].id
        assert [m.id for m in s.client().models.list().data] == [base, *CARTS]
        rng = random.Random(15)
        jobs = [request(i, rng, base) for i in range(CLIENTS)]
        leaving = set(rng.sample(range(CLIENTS), LEAVING))

        async def everyone():
            limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
            client = AsyncOpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=600,
                                 http_client=httpx.AsyncClient(limits=limits, timeout=600))

            async def one(i):
                try:
                    return await (leave(s.url, jobs[i]) if i in leaving else answer(client, jobs[i]))
                except openai.APIStatusError as e:
                    return f"{e.status_code} {e.body}"

            try:
                return await asyncio.gather(*(one(i) for i in range(CLIENTS)))
            finally:
                await client.close()

        start = time.monotonic()
        results = asyncio.run(everyone())
        took = time.monotonic() - start
        left = time.monotonic()
        while (h := s.health())["running"] + h["waiting"] and time.monotonic() - left < 5:
            time.sleep(0.05)
        drained = time.monotonic() - left
        counts = {r: results.count(r) for r in set(results)}
        print(f"\n{CLIENTS} clients in {took:.1f} s: {counts}; running back to 0 in {drained:.2f} s; "
              f"batch peak {h['batch_peak']}, {h['requests']} choices, {h['tokens_generated']} tokens")
        assert counts == {"ok": CLIENTS - LEAVING, "left": LEAVING}, counts
        assert h["running"] == 0 and h["waiting"] == 0, h
        assert s.health()["batch_peak"] > 8  # they really were decoded together
    finally:
        assert s.stop() == 0
    log = s.log.read_text()
    assert "rejected cartridge crafted: " in log and "rejected cartridge outside: " in log
    assert "Traceback" not in log and "request failed" not in log
