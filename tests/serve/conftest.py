"""Fixtures for serving tests: a tiny saved checkpoint, an engine on it, and live uvicorn servers.

The checkpoint is the tests' tiny random-init model (context widened to 1024 tokens so the default
system prompt, images and answers fit), saved once per session with `save_pretrained`. Servers run
the real uvicorn on 127.0.0.1, configured as `llava-ultra serve` configures it (`uvicorn_config`), with a
port the OS picks, in a daemon thread, and are stopped at the
end of the session. Serving tests run torch with ONE intra-op thread: the worker thread, uvicorn and
the HTTP clients share 2 busy cores, and two OpenMP threads there thrash (10-20x slower, measured).
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import pytest
import torch
import uvicorn

from llava_ultra.model.checkpoint import save_pretrained
from llava_ultra.serve.app import ServerSettings, create_app, uvicorn_config
from llava_ultra.serve.engine import Engine, Limits
from tests.helpers import tiny_images, tiny_model, tiny_tokenizer

MODEL_NAME = "tiny-ultra"
API_KEY = "test-key-123"
LIMITS = Limits(
    max_images=4,
    max_image_bytes=200_000,
    max_image_pixels=256 * 256,
    max_prompt_tokens=700,
    max_output_tokens=48,
)


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def frames(n: int, seed: int = 0, size: int = 40) -> list:
    return tiny_images(n, size=size, seed=seed)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / MODEL_NAME
    model = tiny_model(seed=3, **{"llm.inline.max_position_embeddings": 1024})
    save_pretrained(model, folder, tiny_tokenizer())
    return folder


@pytest.fixture(scope="session")
def engine(checkpoint):
    with Engine.from_checkpoint(checkpoint, limits=LIMITS, max_batch_size=8, max_wait_ms=30) as eng:
        yield eng


@pytest.fixture(scope="session")
def server(engine):
    with LiveServer(create_app(engine, ServerSettings(model_name=MODEL_NAME))) as live:
        yield live


@pytest.fixture(scope="session")
def auth_server(engine):
    with LiveServer(create_app(engine, ServerSettings(model_name=MODEL_NAME, api_key=API_KEY))) as live:
        yield live
