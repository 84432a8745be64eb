"""A real `cart serve` process on a free port, for the tests (tiny model and SmolLM2)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path | None, carts: Path, home: Path, log: Path, *args: str,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.stdout = log.with_suffix(".stdout")
        env = {**os.environ, "CART_HOME": str(home), "CART_API_KEY": KEY, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cart", "serve", "--cartridges", str(carts),
             *(["-m", str(model)] if model else []), "--port", str(self.port), *args],
            stdout=open(self.stdout, "wb"), stderr=open(log, "wb"), env=env)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, f"server exited: {log.read_text()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)

    def client(self, key: str = KEY, cls=OpenAI):
        return cls(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def health(self) -> dict:
        """GET /health with the key: the details (without it, only the status)."""
        r = httpx.get(self.url + "/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200
        return r.json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def write_cartridges(model_dir, folder: Path, spans: dict[str, tuple[int, int]]) -> None:
    """``NAME.safetensors`` in ``folder`` for each name: the KV of tokens ``start:end`` of the
    tiny models' training text, with the model's identity in the metadata."""
    import torch

    from cart.kvcache import cartridge_from_tokens
    from cart.models import ModelIdentity, load_model, load_tokenizer, resolve_model
    from tiny import TRAINING_TEXT

    ref = resolve_model(str(model_dir))
    model, tok, ident = load_model(ref), load_tokenizer(ref), ModelIdentity.of(ref)
    md = {"base_model": ident.model_id, "model_config_hash": ident.config_hash,
          "tokenizer_hash": ident.tokenizer_hash}
    ids = tok(TRAINING_TEXT).input_ids
    for name, (start, end) in spans.items():
        cartridge_from_tokens(model, torch.tensor(ids[start:end]), metadata=md).save(
            folder / f"{name}.safetensors")
