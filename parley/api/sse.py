"""Server-sent events exactly as every SDK parses them (SDK-WIRE §1.5).

Only `data: <one-line JSON>\\n\\n` frames: LF line ends, no `event:`/`id:` lines, no comment
keep-alives (Azure's parser rejects anything else). Anthropic's stream alone names each event
(`event: <its type>` before its data): its SDK dispatches on the name. Not sse-starlette nor FastAPI's
EventSourceResponse: both add keep-alive comments and cost several times the CPU per event.
"""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse

from parley.api.errors import ApiError, as_api_error
from parley.api.jsonio import dumps

DONE = b"data: [DONE]\n\n"


def frame(payload: dict, named: bool = False) -> bytes:
    data = b"data: " + dumps(payload) + b"\n\n"
    return b"event: " + payload["type"].encode() + b"\n" + data if named else data


async def frames(payloads: AsyncIterator[list[dict]], error_body: Callable[[ApiError], dict],
                 done: bool, named: bool = False) -> AsyncIterator[bytes]:
    """Batches of payloads as SSE bytes (one write per batch). An error after the first byte
    can no longer change the status code, so it becomes the stream's last event. `named`: each
    event named by its payload's `type` (Anthropic's)."""
    try:
        async for batch in payloads:
            if batch:
                yield b"".join(frame(p, named) for p in batch)
    except Exception as exc:  # noqa: BLE001 - any failure ends the stream with an error event
        yield frame(error_body(as_api_error(exc)), named)
        return
    if done:
        yield DONE


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: finished, failed, or cancelled by a
    client disconnect (even before the body iterator first ran, when its own `finally` would not)."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(body, headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                        "x-accel-buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
