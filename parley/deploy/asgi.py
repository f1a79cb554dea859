"""One HTTP request carried from the Ray ingress to a replica and run through Parley's own
FastAPI app there, in process, as the ASGI server would run it: the replica answers exactly as
`parley serve` does (every route, SSE streams, /metrics).

The answer comes back as a stream: a `ResponseStart` (status and headers), then body chunks.
When the caller stops reading (the client went away, or Ray cancelled the call) the app is told
`http.disconnect`, which aborts the engine request as it does behind uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Union

log = logging.getLogger("parley.deploy")

# how long an app gets to finish after its caller went away (it aborts its engine request and
# returns at once; this bounds a bug, not the normal path)
DISCONNECT_GRACE_S = 10.0


@dataclass
class HttpCall:
    """What the replica needs of an HTTP request: it crosses processes pickled."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    scheme: str = "http"
    http_version: str = "1.1"

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": self.http_version,
                "method": self.method, "scheme": self.scheme, "path": self.path, "raw_path": self.path.encode(),
                "root_path": "", "query_string": self.query_string, "headers": list(self.headers),
                "client": self.client, "server": None, "state": {}}


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def run_asgi(app, call: HttpCall) -> AsyncIterator[Union[ResponseStart, bytes]]:
    """Runs `call` through the ASGI `app`; yields its ResponseStart, then each non-empty body chunk."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(call.scope(), receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    finished = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    finished = True
                    break
        if not finished:  # the app returned (or raised) without finishing its answer
            await task
            raise RuntimeError(f"{call.method} {call.path}: the app ended without a complete response")
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
            except asyncio.TimeoutError:
                log.warning("%s %s: the app did not end within %.0f s of its caller leaving; cancelled",
                            call.method, call.path, DISCONNECT_GRACE_S)
                task.cancel()
            except Exception:  # noqa: BLE001 - the answer was already given; the app logs its own errors
                pass
