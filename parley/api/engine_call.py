"""One HTTP request's use of the engine, opened and closed exactly once.

It holds the admission slot its route took (GenerationRoute), drives one engine iterator per GenerationRequest (a /v1/completions
call with a list of prompts makes several) through pump tasks into one queue, watches the client
for a disconnect while no response is being streamed, and writes the request's metrics. Closing it
cancels the pumps, which closes the engine iterators: the engine aborts those requests and frees
their KV blocks.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Request

from parley.api.errors import ClientDisconnected, as_api_error
from parley.observability.metrics import RequestRecord
from parley.types import FinalEvent, GenerationRequest, TokenEvent

if TYPE_CHECKING:
    from parley.api.state import ServerState

Event = TokenEvent | FinalEvent
_END = object()  # a pump's iterator is exhausted
_DISCONNECTED = object()  # the client went away


class EngineCall:
    def __init__(self, server: "ServerState", http: Request, requests: list[GenerationRequest]):
        self._engine = server.ready_engine()
        self._admission = server.admission
        self._record: RequestRecord = http.state.record
        self._record.user = requests[0].user if requests else None
        self._http = http
        self._requests = requests
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._watcher: asyncio.Task | None = None
        self._early: list[tuple[int, object]] = []  # what start() read ahead
        self._open = len(requests)
        self._finals: list[list[FinalEvent]] = [[] for _ in requests]
        # the slot the route took is ours to release now
        self._admitted_at: float | None = http.state.admitted_at
        http.state.admitted_at = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Waits for every engine request's first event, so validation and overload errors (raised
        before any event) surface here, as HTTP statuses."""
        self._watcher = asyncio.create_task(self._watch_disconnect())
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self._requests)]
        waiting = set(range(len(self._requests)))
        while waiting:
            i, item = await self._next()
            if isinstance(item, BaseException):
                self._fail(item)
            self._early.append((i, item))
            waiting.discard(i)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The outcome is written before the engine hears of the abort (the engine thread may free
        # the KV blocks while the pumps unwind): /metrics never shows them freed but uncounted.
        if self._open == 0:
            self._record.succeeded(self._finals)
        elif self._admitted_at is not None:
            self._record.cancelled()  # no-op when a failure was recorded first
        tasks = self._tasks + ([self._watcher] if self._watcher else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._admitted_at is not None:
            self._admission.release(self._admitted_at)

    # -- reading ------------------------------------------------------------------------------
    def stream(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """Hands disconnect detection to the streaming response, then yields the events."""
        self._stop_watching()
        return self.batches()

    async def batches(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """(request index, event) pairs, grouped as they arrive: one engine step's events come
        together, so a sequence's last TokenEvent and its FinalEvent share a batch."""
        pending, self._early = self._early, []
        while self._open:
            if not pending:
                pending.append(await self._next())
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            batch = []
            for i, item in pending:
                if item is _DISCONNECTED:  # drained along with events: as in _next()
                    raise ClientDisconnected()
                if item is _END:
                    self._open -= 1
                elif isinstance(item, BaseException):
                    self._fail(item)
                else:
                    if isinstance(item, FinalEvent):
                        self._finals[i].append(item)
                    batch.append((i, item))
            pending = []
            if batch:
                yield batch

    async def collect(self) -> list[list[FinalEvent]]:
        """Every engine request's FinalEvents, ordered by sequence index."""
        async for _ in self.batches():
            pass
        return [sorted(group, key=lambda f: f.index) for group in self._finals]

    # -- internals ----------------------------------------------------------------------------
    async def _next(self) -> tuple[int, object]:
        i, item = await self._queue.get()
        if item is _DISCONNECTED:
            raise ClientDisconnected()
        return i, item

    def _fail(self, exc: BaseException) -> None:
        """Records the engine's failure (before close() could take it for a cancellation), raises it."""
        self._record.failed(as_api_error(exc).error_type)
        raise exc

    async def _pump(self, i: int, request: GenerationRequest) -> None:
        events = self._engine.generate(request)
        try:
            async for event in events:
                if isinstance(event, TokenEvent):
                    self._record.first_token()
                self._queue.put_nowait((i, event))
            self._queue.put_nowait((i, _END))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            self._queue.put_nowait((i, exc))
        finally:
            await events.aclose()

    async def _watch_disconnect(self) -> None:
        while (await self._http.receive())["type"] != "http.disconnect":
            pass
        self._queue.put_nowait((-1, _DISCONNECTED))

    def _stop_watching(self) -> None:
        """Two readers of the ASGI receive channel would race, so StreamingResponse's own
        listener takes over. A disconnect seen already stays queued and ends the stream."""
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()

