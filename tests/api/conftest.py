"""Real servers in subprocesses, started once per session on free loopback ports.

- `server`: `python -m parley serve` on the default model (SmolLM2-135M), one engine thread (tests/server.py).
- `strict_server`: --api-key, --max-concurrent-requests 1 and CORS (the default model too: the
  tiny random one generates so fast that a stream ends before a second request can collide).
- `fake_server`: the real CLI and app around tests/api/fake_engine.py, for engine failures;
  `lenient_fake_server` the same with `--unknown-fields ignore`.
- `thinker`: a tiny random model whose template thinks (tiny_model.THINKING_TEMPLATE), served as
  "thinker": everything it writes is thinking until a budget forces "</think>".
- `infiller`: a tiny random Qwen2 whose vocabulary has Qwen2.5-Coder's fill-in-the-middle tokens
  (INFILL_TOKENS), served as "coder".
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from server import API_KEY, CLIENT_TIMEOUT_S, CORS_ORIGIN, ServerProcess, start_default_server
from tiny_model import INFILL_TOKENS, make_tiny_model

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = start_default_server(tmp_path_factory)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory):
    proc = ServerProcess([sys.executable, "-m", "parley", "serve", "--num-threads", "1", "--max-batch-total-tokens",
                          "4096", "--api-key", API_KEY, "--max-concurrent-requests", "1", "--cors-allow-origin",
                          CORS_ORIGIN, "--served-model-name", "m"],
                         tmp_path_factory.mktemp("strict") / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory):
    proc = ServerProcess([sys.executable, str(HERE / "fake_server.py"), "serve"],
                         tmp_path_factory.mktemp("fake") / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def lenient_fake_server(tmp_path_factory):
    proc = ServerProcess([sys.executable, str(HERE / "fake_server.py"), "serve", "--unknown-fields", "ignore"],
                         tmp_path_factory.mktemp("lenient_fake") / "server.log").start()
    yield proc
    proc.stop()


def tiny_server(tmp_path_factory, name: str, *args, **kwargs) -> ServerProcess:
    """A started server on make_tiny_model(*args, **kwargs), in float32, served as `name`."""
    model = make_tiny_model(tmp_path_factory.mktemp(name), *args, **kwargs)
    return ServerProcess([sys.executable, "-m", "parley", "serve", "--model-id", model, "--dtype", "float32",
                          "--num-threads", "1", "--max-batch-total-tokens", "4096", "--served-model-name", name],
                         tmp_path_factory.mktemp(f"{name}_server") / "server.log").start()


@pytest.fixture(scope="session")
def thinker(tmp_path_factory):
    proc = tiny_server(tmp_path_factory, "thinker", seed=3, thinking=True)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def infiller(tmp_path_factory):
    proc = tiny_server(tmp_path_factory, "coder", "qwen2", seed=5, special_tokens=INFILL_TOKENS)
    yield proc
    proc.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client
