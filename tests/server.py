"""Real Parley servers in subprocesses, on free loopback ports, for tests that speak HTTP.

`start_default_server` runs `python -m parley serve` on the default model (SmolLM2-135M) with one
engine thread; tests/api and tests/sdk both start theirs with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).parent.parent
READY_TIMEOUT_S = 300  # the 2 shared cores may be busy: loading can take a while
# Every test client waits this long for an answer: a prefill of 2,000 tokens took over 120 s while
# another CPU-heavy process shared the two cores. Tests bound their own loops; this only says that
# a slow machine is not a failure.
CLIENT_TIMEOUT_S = 600
DEFAULT_SERVE_ARGS = ["--num-threads", "1", "--max-batch-total-tokens", "16384", "--max-total-tokens", "2048",
                      "--max-client-batch-size", "3", "--served-model-name", "m",
                      "--served-model-name", "Qwen/Qwen2.5-7B-Instruct"]  # an alias, as SiliconFlow's clients name it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command + ["--hostname", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self.env = env or {}  # on top of this process's environment
        self.health_statuses: list[int] = []  # what /health answered while starting
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                status = httpx.get(self.url + "/health", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            self.health_statuses.append(status)
            if status == 200:
                return self
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"server not healthy within {READY_TIMEOUT_S}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


def start_default_server(tmp_path_factory, name: str = "server", *extra_args: str) -> ServerProcess:
    """A started server on the default model, with `extra_args` for `parley serve`; the caller stops it."""
    return ServerProcess([sys.executable, "-m", "parley", "serve", *DEFAULT_SERVE_ARGS, *extra_args],
                         tmp_path_factory.mktemp(name) / "server.log").start()


API_KEY = "test-key"
CORS_ORIGIN = "http://app.example"


def sse_events(response: httpx.Response) -> list[str]:
    """The data of each SSE event, checking the framing every SDK needs (SDK-WIRE §1.5)."""
    assert response.headers["content-type"] == "text/event-stream"
    raw = response.read().decode()
    assert "\r" not in raw
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    for f in frames[:-1]:
        assert f.startswith("data: ") and "\n" not in f, f
    return [f[len("data: "):] for f in frames[:-1]]


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in a /metrics body."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
