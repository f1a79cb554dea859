"""EngineCall in process, with stand-ins for the engine and the ASGI request: the orderings that a
real server under load produces only now and then."""

import asyncio
from types import SimpleNamespace

import pytest

from parley.api.engine_call import EngineCall
from parley.api.errors import ClientDisconnected
from parley.types import GenerationRequest


class Outcome:
    """A stand-in RequestRecord that remembers how the request ended."""

    def __init__(self):
        self.ended = []

    def succeeded(self, finals):
        self.ended.append("succeeded")

    def failed(self, error_type):
        self.ended.append("failed")

    def cancelled(self):
        self.ended.append("cancelled")


class EndlessEngine:
    """Yields an event every loop iteration until the caller stops, then says it was aborted."""

    def __init__(self):
        self.aborted = False

    async def generate(self, request):
        try:
            while True:
                yield object()  # a token event; EngineCall only passes it on
                await asyncio.sleep(0)
        finally:
            self.aborted = True


async def test_a_disconnect_drained_along_with_token_events_still_cancels_the_request():
    # The client leaves while events keep coming, so the disconnect marker reaches the queue
    # behind events and is drained with them, not awaited alone.
    engine, outcome = EndlessEngine(), Outcome()
    admission = SimpleNamespace(release=lambda acquired_at: None)
    server = SimpleNamespace(ready_engine=lambda: engine, admission=admission)

    async def receive():
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    http = SimpleNamespace(state=SimpleNamespace(record=outcome, admitted_at=0.0), receive=receive)
    call = EngineCall(server, http, [GenerationRequest("x")])
    await call.start()
    with pytest.raises(ClientDisconnected):
        await asyncio.wait_for(call.collect(), timeout=10)
    await call.close()
    assert outcome.ended == ["cancelled"] and engine.aborted
