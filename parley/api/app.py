"""The FastAPI application: routes, error handlers, middleware, and the model loaded after the
socket is bound (so /health answers 503 while loading, then 200)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from parley.api import dialects, lora_routes, playground, status
from parley.api.anthropic import routes as anthropic_routes
from parley.api.responses import routes as responses_routes
from parley.api.auth import ApiKeyAuth
from parley.api.errors import install_handlers
from parley.api.openai import routes as openai_routes
from parley.api.state import VERSION, ServerState
from parley.api.tgi import routes as tgi_routes
from parley.config import EngineConfig, ServerConfig
from parley.types import Engine

log = logging.getLogger("parley.api")


def create_app(config: ServerConfig, engine_config: EngineConfig, load_engine: Callable[[], Engine],
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """`load_engine` is called in a worker thread once the server runs; if it raises,
    `on_load_failure` is told (the CLI stops the server) and /health stays 503."""
    state = ServerState(config, engine_config, load_engine)

    async def load() -> None:
        try:
            await state.load()
        except Exception as exc:
            log.exception("model failed to load")
            if on_load_failure is not None:
                on_load_failure(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        await state.shutdown()

    app = FastAPI(title="Parley", version=VERSION, lifespan=lifespan, dependencies=[Depends(dialects.check_api_version)],
                  description="An LLM inference server: Hugging Face TGI's API and OpenAI-style chat.")
    app.state.server = state
    install_handlers(app)
    for router in (tgi_routes.router, tgi_routes.tokenize_router, openai_routes.router, openai_routes.models_router,
                   anthropic_routes.router, anthropic_routes.count_router, responses_routes.router,
                   responses_routes.stored_router, status.router, lora_routes.router):
        app.include_router(router)
    if config.playground:
        app.include_router(playground.router)
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key,
                           open_pages=playground.PAGE_PATHS if config.playground else frozenset())
    if config.cors_allow_origin:  # added last: outermost, so preflights and 401s carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origin), allow_methods=["*"],
                           allow_headers=["*"])
    return app
