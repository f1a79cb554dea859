"""What `parley serve` tells the console: the weights read (with MB/s), one line at ready with the
playground's and the docs' URLs, and a status line every --status-interval seconds while busy.

The status lines run on the fake engine (tests/api/fake_engine.py), whose 600-token answer keeps
the server busy for a few seconds; no assertion counts lines per second."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx

from server import CLIENT_TIMEOUT_S, ServerProcess

HERE = Path(__file__).parent
LONG = {"inputs": "Hi", "parameters": {"max_new_tokens": 600}}
STATUS = re.compile(r"status: (\d+) running, (\d+) waiting, ([\d.]+) tok/s, KV cache \d+% \((\d+)/(\d+) blocks\)")


def run_fake(tmp_path, *args: str) -> str:
    """Starts the fake-engine server with `args`, has it answer one long request, stops it; its log."""
    proc = ServerProcess([sys.executable, str(HERE / "fake_server.py"), "serve", *args], tmp_path / "server.log").start()
    try:
        r = httpx.post(proc.url + "/generate", json=LONG, timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 200
    finally:
        proc.stop()
    return proc.log()


def test_the_ready_line_gives_the_playground_and_docs_urls(server):
    url = f"http://127.0.0.1:{server.port}"
    log = server.log()
    assert f"Parley is ready: open {url}/ in a browser for the playground (API docs: {url}/docs)" in log
    # and before it, the weights read from the default model's GGUF
    assert re.search(r"read \d+ tensors, [\d.]+ MB in [\d.]+ s \([\d.]+ MB/s\)", log), log[-2000:]


def test_status_lines_appear_under_load(tmp_path):
    log = run_fake(tmp_path, "--status-interval", "0.2")
    lines = STATUS.findall(log)
    assert lines, log[-2000:]
    assert any(running == "1" and float(rate) > 0 for running, _, rate, _, _ in lines), lines
    assert all(int(total) == 4096 // 16 for *_, total in lines)  # the fake engine's KV pool


def test_no_status_lines_with_interval_0_and_no_playground_in_the_ready_line(tmp_path):
    log = run_fake(tmp_path, "--status-interval", "0", "--no-playground")
    assert "status:" not in log
    assert re.search(r"Parley is ready \(API docs: http://127\.0\.0\.1:\d+/docs\)", log), log[-2000:]
