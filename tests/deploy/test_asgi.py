"""One HTTP request run through an ASGI app in process, as a replica runs Parley's app."""

import asyncio

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, StreamingResponse

from parley.deploy.asgi import HttpCall, ResponseStart, run_asgi


def make_app(events: list) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        return JSONResponse({"body": (await request.body()).decode(), "query": request.url.query,
                             "header": request.headers.get("x-a")}, headers={"set-cookie": "a=1"})

    @app.get("/stream")
    async def stream():
        async def chunks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    return app


async def collect(app, call):
    return [part async for part in run_asgi(app, call)]


async def test_a_request_gets_the_apps_status_headers_and_body():
    call = HttpCall("POST", "/echo", b"q=1", [(b"x-a", b"b"), (b"content-type", b"text/plain")], b"hello")
    start, *chunks = await collect(make_app([]), call)
    assert isinstance(start, ResponseStart) and start.status == 200
    assert start.header(b"set-cookie") == b"a=1"
    assert b"".join(chunks) == b'{"body":"hello","query":"q=1","header":"b"}'


async def test_an_unknown_route_and_a_failing_one_answer_as_the_app_does():
    app = make_app([])
    start, *_ = await collect(app, HttpCall("GET", "/nope"))
    assert start.status == 404
    answer = run_asgi(app, HttpCall("GET", "/boom"))
    assert (await answer.__anext__()).status == 500  # Starlette's error middleware answers, then raises


async def test_a_caller_that_stops_reading_disconnects_the_app():
    events: list = []
    answer = run_asgi(make_app(events), HttpCall("GET", "/stream"))
    assert (await answer.__anext__()).status == 200
    assert await answer.__anext__() == b"data: 0\n\n"
    await answer.aclose()  # what Ray does when the client goes away
    for _ in range(200):
        if events:
            break
        await asyncio.sleep(0.05)
    assert events == ["stream closed"]
