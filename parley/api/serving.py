"""The one path every generation route takes: engine call -> JSON answer or SSE stream."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.types import Message, Receive

from parley.api import sse
from parley.api.engine_call import EngineCall, Event
from parley.api.errors import ApiError, ClientDisconnected, as_api_error, error_form
from parley.api.jsonio import JSONBody, StrictJSONRequest
from parley.api.state import server_of
from parley.types import FinalEvent, GenerationRequest

Batches = AsyncIterator[list[tuple[int, Event]]]

# A generation route's 200: JSON, or Server-Sent Events when the body (or the route) asks to stream
# (the schema is an event's: `data` holds one JSON payload, or [DONE] at the end of an OpenAI stream)
STREAMING_RESPONSES = {200: {"description": "The answer (JSON), or its events (SSE) when streaming", "content": {
    "text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}}}}}


async def respond(
    http: Request,
    requests: list[GenerationRequest],
    *,
    stream: bool,
    to_json: Callable[[list[list[FinalEvent]]], Any],
    to_payloads: Callable[[Batches], AsyncIterator[list[dict]]],
    done_marker: bool,
    named_events: bool = False,
) -> Response:
    """Runs `requests` for one HTTP request. `to_json` shapes the FinalEvents of each engine request
    into the non-streaming answer; `to_payloads` turns event batches into SSE payload batches
    (`named_events`: sse.frames')."""
    call = EngineCall(server_of(http), http, requests)
    try:
        await call.start()
        if stream:
            body = sse.frames(to_payloads(call.stream()), error_form(http).body, done_marker, named_events)
            return sse.EventStream(body, on_close=call.close)
        finals = await call.collect()
    except BaseException:
        await call.close()
        raise
    await call.close()
    return JSONBody(to_json(finals))


class StrictJSONRoute(APIRoute):
    """A route whose body is read whole before FastAPI sees it: at most `--payload-limit` bytes
    (a 413 past it, as TGI's payload limit; a larger Content-Length is refused unread), then parsed
    as strict JSON (jsonio.StrictJSONRequest)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            limit = server_of(request).config.payload_limit
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise too_large(limit)
            body = StrictJSONRequest(request.scope, _limited(request.receive, limit))
            await body.body()  # here, not in FastAPI's handler, which turns any error into a 400
            return await handler(body)

        return strict


def _limited(receive: Receive, limit: int) -> Receive:
    size = 0

    async def limited() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > limit:
            raise too_large(limit)
        return message

    return limited


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Payload too large: the body holds more than {limit} bytes (--payload-limit)",
                    "payload_too_large")


class GenerationRoute(StrictJSONRoute):
    """A route that runs the engine: every request, even one whose body fails validation, gets a
    metrics record, closed by its outcome."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            server = server_of(request)
            request.state.record = record = server.metrics.record_request(self.path, request.headers)
            request.state.admitted_at = None
            try:
                # The slot is taken before the body is read: an overloaded server answers at once.
                request.state.admitted_at = server.admission.acquire()
                # Then the requests that arrived with this one take their slot or their 429 before
                # this one's body is handled: in a burst of 300 at once, a 429 waited for every
                # admitted request's template and tokenizer (p99 258 -> see BENCHMARKS.md).
                await asyncio.sleep(0)
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
            finally:
                if request.state.admitted_at is not None:  # no EngineCall took the slot over
                    server.admission.release(request.state.admitted_at)

        return run

