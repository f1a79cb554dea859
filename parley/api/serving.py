"""The one path every generation route takes: engine call -> JSON answer or SSE stream."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError

from parley.api import sse
from parley.api.engine_call import EngineCall, Event
from parley.api.errors import ClientDisconnected, as_api_error, error_body
from parley.api.jsonio import JSONBody, StrictJSONRoute
from parley.api.state import server_of
from parley.types import FinalEvent, GenerationRequest

Batches = AsyncIterator[list[tuple[int, Event]]]


async def respond(
    http: Request,
    requests: list[GenerationRequest],
    *,
    stream: bool,
    to_json: Callable[[list[list[FinalEvent]]], Any],
    to_payloads: Callable[[Batches], AsyncIterator[list[dict]]],
    done_marker: bool,
) -> Response:
    """Runs `requests` for one HTTP request. `to_json` shapes the FinalEvents of each engine request
    into the non-streaming answer; `to_payloads` turns event batches into SSE payload batches."""
    call = EngineCall(server_of(http), http, requests)
    try:
        await call.start()
        if stream:
            path = http.url.path
            body = sse.frames(to_payloads(call.stream()), lambda err: error_body(path, err), done_marker)
            return sse.EventStream(body, on_close=call.close)
        finals = await call.collect()
    except BaseException:
        await call.close()
        raise
    await call.close()
    return JSONBody(to_json(finals))


class GenerationRoute(StrictJSONRoute):
    """A route that runs the engine: every request, even one whose body fails validation, gets a
    metrics record, closed by its outcome."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            server = server_of(request)
            request.state.record = record = server.metrics.record_request()
            try:
                server.admission.check()  # before the body is read: an overloaded server answers at once
                return await handler(request)
            except ClientDisconnected:
                record.cancelled()
                raise
            except RequestValidationError:
                record.failed("validation")
                raise
            except Exception as exc:
                record.failed(as_api_error(exc).error_type)
                raise

        return run

