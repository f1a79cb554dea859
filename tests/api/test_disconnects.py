"""Clients that go away free the engine: 64 concurrent streams with random disconnects, and a
non-streaming request abandoned mid-generation. Afterwards the engine must be idle with every KV
block free, and the streams that stayed must be complete."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from server import metric

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


def wait_until_idle(url: str, timeout_s: float = 60) -> str:
    """/metrics once nothing runs or waits and no KV block is used (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(url + "/metrics").text
        busy = sum(metric(text, m) for m in ("parley_kv_blocks_used", "tgi_batch_current_size", "tgi_queue_size"))
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


async def one_stream(client: httpx.AsyncClient, i: int, leave_after: int | None) -> dict:
    """Streams one chat completion; with `leave_after`, disconnects after that many chunks."""
    body = {"messages": MESSAGES, "max_tokens": 12, "min_tokens": 12, "seed": i, "stream": True}
    chunks, done = [], False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[len("data: "):]))
            if leave_after is not None and len(chunks) >= leave_after:
                break  # leaving the block closes the connection mid-stream
    return {"chunks": chunks, "done": done, "left": leave_after is not None}


async def test_64_concurrent_streams_with_random_disconnects(server):
    before = httpx.get(server.url + "/metrics").text
    rng = random.Random(1234)
    plan = [rng.randint(1, 6) if rng.random() < 0.5 else None for _ in range(64)]
    async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                 limits=httpx.Limits(max_connections=64)) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(one_stream(client, i, leave) for i, leave in enumerate(plan))), timeout=600)

    stayed = [r for r in results if not r["left"]]
    assert len(stayed) == plan.count(None) > 0
    for r in stayed:
        tokens = [c for c in r["chunks"] if c["choices"] and c["choices"][0]["finish_reason"] is None]
        final = r["chunks"][-1]
        assert r["done"] and len(tokens) == 12
        assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 12

    after = wait_until_idle(server.url)
    assert metric(after, "parley_kv_blocks_used") == 0
    assert metric(after, "tgi_batch_current_size") == 0 and metric(after, "tgi_queue_size") == 0
    delta = {m: metric(after, m) - metric(before, m)
             for m in ("tgi_request_count", "tgi_request_success", "parley_request_cancelled")}
    assert delta["tgi_request_count"] == 64
    # a client that leaves after the server sent its last chunk still counts as a success
    assert delta["tgi_request_success"] + delta["parley_request_cancelled"] == 64
    assert delta["tgi_request_success"] >= len(stayed)


def test_abandoned_non_streaming_request_is_aborted(server):
    before = httpx.get(server.url + "/metrics").text
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500}}
    with pytest.raises(httpx.ReadTimeout):  # ~1500 tokens take far longer than the client waits
        httpx.post(server.url + "/generate", json=body, timeout=3)
    after = wait_until_idle(server.url)
    assert metric(after, "parley_kv_blocks_used") == 0 and metric(after, "tgi_batch_current_size") == 0
    assert metric(after, "parley_request_cancelled") == metric(before, "parley_request_cancelled") + 1
