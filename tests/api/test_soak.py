"""Soak (issue 15): 200 streaming chats, 32 at a time, a fifth of whose clients leave mid-stream,
against a server on a tiny random model: every client that stayed gets its whole answer, no KV block
stays in use, and the server's RSS ends within 10% of where it was after a warm-up wave.
`python bench/soak.py` runs the full 1,000 at 64 and prints the figures; the load is its `soak()`."""

from __future__ import annotations

import sys

import pytest

from server import REPO
from tiny_model import make_tiny_model

sys.path.insert(0, str(REPO / "bench"))
from soak import soak, start_server  # noqa: E402  (bench/soak.py)


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    # PyTorch's oneDNN kernel caches fill up over a soak (~220 MB here at their default size):
    # start_server keeps them small, so that memory that grows with requests shows (bench/soak.py)
    proc = start_server(make_tiny_model(tmp_path_factory.mktemp("soak_model")), tmp_path_factory.mktemp("soak"))
    yield proc
    proc.stop()


async def test_soak_with_disconnects_leaves_nothing_behind(soak_server):
    result = await soak(soak_server.url, soak_server.proc.pid, requests=200, concurrency=32, leave_share=0.2,
                        max_tokens=16, seed=1)
    print(result.report())
    assert result.left > 0 and result.cancelled > 0  # clients did leave while their requests ran
    assert result.problems() == []
    assert result.statuses == {200: 200}
