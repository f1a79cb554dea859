"""The bound on prompt tokens waiting for prefill (`--max-queued-tokens`): alone with a fake clock,
then in an engine whose steps are held back, so prompts stay queued for as long as the test wants."""

from __future__ import annotations

import asyncio
import threading

import pytest
from tiny_model import make_tiny_model, start_tiny_engine

from parley.engine import backlog as backlog_module
from parley.engine.backlog import PromptBacklog
from parley.types import GenerationRequest, OverloadedError, StoppingCriteria


def test_past_the_bound_a_prompt_is_refused_with_the_time_the_excess_takes_to_drain(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(backlog_module.time, "monotonic", lambda: now[0])
    backlog = PromptBacklog(limit=1000)
    for _ in range(20):  # the engine prefills 500 tokens a second
        backlog.admit(500)
        now[0] += 1.0
        backlog.drained(500, prefilled=True)
    assert backlog.tokens == 0 and 450 < backlog.rate < 600
    backlog.admit(800)
    with pytest.raises(OverloadedError) as refused:
        backlog.admit(1700)  # 1,500 tokens past the bound: about 3 s at 500 tok/s
    assert 3 <= refused.value.retry_after <= 4 and "--max-queued-tokens" in str(refused.value)
    assert backlog.tokens == 800  # a refused prompt is not counted
    backlog.admit(200)  # up to the bound is fine
    backlog.drained(200, prefilled=False)  # a request that left before its prefill teaches no rate
    assert backlog.tokens == 800


def test_an_empty_queue_takes_a_prompt_longer_than_the_bound():
    backlog = PromptBacklog(limit=10)
    backlog.admit(50)
    assert backlog.tokens == 50


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), arch="llama", seed=0)


async def test_the_engine_refuses_past_its_queued_tokens_and_takes_requests_again_once_drained(model_dir):
    engine = start_tiny_engine(model_dir, max_queued_tokens=30)
    gate = threading.Event()
    execute = engine.core.runner.execute

    def held(*args, **kwargs):  # on the engine thread: no step runs until the test opens the gate
        gate.wait(60)
        return execute(*args, **kwargs)

    engine.core.runner.execute = held

    def request(words: int) -> GenerationRequest:
        return GenerationRequest(" ".join(["hello"] * words), stopping=StoppingCriteria(max_new_tokens=2))

    async def run(r):
        return [e async for e in engine.generate(r)]

    try:
        first = asyncio.create_task(run(request(5)))
        while engine.backlog.tokens == 0:
            await asyncio.sleep(0.01)
        queued = engine.backlog.tokens
        assert 15 < queued <= 30  # a second such prompt is past the bound
        with pytest.raises(OverloadedError) as refused:
            await run(request(5))
        assert refused.value.retry_after >= 1 and engine.backlog.tokens == queued
        gate.set()
        await asyncio.wait_for(first, timeout=60)
        assert engine.backlog.tokens == 0
        await asyncio.wait_for(run(request(5)), timeout=60)  # taken again
        assert engine.backlog.tokens == 0
    finally:
        gate.set()
        engine.core.stop()
