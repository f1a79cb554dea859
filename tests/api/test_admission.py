"""The edge's admission: the concurrency limit and the Retry-After its 429s carry (a fake clock, no
waiting), and the health of the engine it admits to."""

from __future__ import annotations

import httpx
import pytest

from parley.api import admission as admission_module
from parley.api.admission import Admission
from parley.api.errors import ApiError


def test_full_means_429_with_a_retry_after_from_recent_hold_times(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(admission_module.time, "monotonic", lambda: now[0])
    admission = Admission(limit=2)
    for _ in range(60):  # requests that each hold their slot 30 s
        taken = admission.acquire()
        now[0] += 30
        admission.release(taken)
    first, second = admission.acquire(), admission.acquire()
    with pytest.raises(ApiError) as refused:
        admission.acquire()
    # two slots held ~30 s each: one frees in about 15 s
    assert refused.value.status == 429 and 14 <= refused.value.retry_after <= 16
    admission.release(first)
    assert admission.acquire() and admission.in_flight == 2
    del second


def test_retry_after_is_at_least_a_second():
    admission = Admission(limit=1)
    admission.acquire()
    with pytest.raises(ApiError) as refused:
        admission.acquire()
    assert refused.value.retry_after >= 1


def test_an_engine_whose_loop_stopped_is_unhealthy():
    from types import SimpleNamespace

    from parley.api.state import ServerState
    from parley.config import EngineConfig, ServerConfig

    state = ServerState(ServerConfig(), EngineConfig(), lambda: None)
    state.engine = SimpleNamespace(failure=None)
    assert state.ready_engine() is state.engine
    state.engine.failure = "RuntimeError: boom"
    with pytest.raises(ApiError) as unhealthy:
        state.ready_engine()  # what /health and every generation route ask first
    assert unhealthy.value.status == 503 and "boom" in unhealthy.value.message


@pytest.mark.parametrize("path, body, shape", [
    ("/generate", {"inputs": "QUEUE_FULL"}, lambda b: b == {"error": b["error"], "error_type": "overloaded"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "QUEUE_FULL"}]},
     lambda b: b["error"]["type"] == "overloaded"),
    ("/v1/messages", {"model": "fake-model", "max_tokens": 5, "messages": [{"role": "user", "content": "QUEUE_FULL"}]},
     lambda b: b["type"] == "error" and b["error"]["type"] == "rate_limit_error"),
])
def test_the_engines_queued_tokens_bound_is_a_429_with_its_retry_after_in_each_dialect(fake_server, path, body, shape):
    # the fake engine refuses "QUEUE_FULL" as the real one's PromptBacklog does (tests/engine/test_backlog.py)
    r = httpx.post(fake_server.url + path, json=body, timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"] == "7", r.text
    assert shape(r.json()) and "--max-queued-tokens" in r.text


async def test_loading_pauses_the_collector_and_freezes_what_it_made_even_when_it_fails():
    import gc

    from parley.api.state import ServerState
    from parley.config import EngineConfig, ServerConfig

    def failing():
        assert not gc.isenabled()  # no collections while the model's objects are made
        raise RuntimeError("no model here")

    state = ServerState(ServerConfig(), EngineConfig(), failing)
    with pytest.raises(RuntimeError):
        await state.load()
    assert gc.isenabled() and gc.get_freeze_count() > 0
    gc.unfreeze()
