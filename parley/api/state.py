"""What the running server holds: its settings, the engine once loaded, admission and metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from fastapi import Request

from parley.api.admission import Admission
from parley.api.errors import ApiError
from parley.api.responses.store import ResponseStore
from parley.config import EngineConfig, ServerConfig
from parley.observability.console import StatusLine
from parley.observability.metrics import Metrics
from parley.observability.tracing import Tracing
from parley.types import Engine

log = logging.getLogger("parley.api")

try:
    VERSION = version("parley")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0.0.0"


class ServerState:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig, load_engine: Callable[[], Engine]):
        self.config = config
        self.engine_config = engine_config
        self.engine: Engine | None = None  # set once loaded and started: /health is 200 from then on
        self.load_error: BaseException | None = None
        self.admission = Admission(engine_config.max_concurrent_requests)
        self.tracing = Tracing(config.otlp_endpoint, config.otlp_service_name) if config.otlp_endpoint else None
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else None, self.tracing)
        self.created = int(time.time())
        self.system_fingerprint = f"parley-{VERSION}"
        self._load_engine = load_engine
        self.draining = False  # set on SIGTERM (cli.DrainingServer): new requests get 503
        self.responses = ResponseStore()  # what previous_response_id refers to (OpenAI's Responses API)
        self._status_task: asyncio.Task | None = None

    @property
    def model_name(self) -> str:
        """The name responses report: the first served name."""
        return self.model_names[0]

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names OpenAI-style requests may give as `model` (--served-model-name), as /v1/models lists them."""
        return self.config.served_model_names or (self.ready_engine().info.model_id,)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            message = f"Model failed to load: {self.load_error}" if self.load_error else "Model is loading"
            raise ApiError(503, message, "unhealthy")
        if self.engine.failure:
            raise ApiError(503, f"Engine stopped: {self.engine.failure}", "unhealthy")
        if self.draining:
            raise ApiError(503, "Server is shutting down: requests in flight are finishing", "unhealthy")
        return self.engine

    async def load(self) -> None:
        """Loads the model off the event loop (the socket already answers /health with 503)."""
        started = time.monotonic()
        config = self.engine_config
        log.info("loading model %s (dtype %s%s, device %s)", config.model_id or "<default SmolLM2>", config.dtype,
                 f", quantize {config.quantize}" if config.quantize else "", config.device)
        # What loading makes (modules, the model's Python objects, the tokenizer's tables) lives as long
        # as the server: collecting while it is made is wasted (six full collections of 15-92 ms at
        # start), and frozen out of the collector's sight afterwards, a full collection under load scans
        # only what requests made. Before, each one paused every thread (the engine's too) 57-96 ms
        # while 128 streams ran (bench/overload.py; the probes' slowest 429 went from 58 to 10 ms).
        gc.disable()
        try:
            engine = await asyncio.to_thread(self._load_engine)
            engine.start()
        except Exception as exc:
            self.load_error = exc
            raise
        finally:
            gc.collect()
            gc.freeze()
            gc.enable()
        self.engine = engine
        info = engine.info
        log.info("model ready in %.1fs: %s (%s on %s), max_input_tokens=%s max_total_tokens=%s "
                 "max_concurrent_requests=%s", time.monotonic() - started, info.model_id, info.dtype,
                 info.device, info.max_input_tokens, info.max_total_tokens, info.max_concurrent_requests)
        url = browser_url(self.config)
        log.info("Parley is ready%s (API docs: %s/docs)",
                 f": open {url}/ in a browser for the playground" if self.config.playground else "", url)
        if self.config.status_interval > 0:
            self._status_task = asyncio.create_task(self._report_status(self.config.status_interval))

    async def _report_status(self, every_s: float) -> None:
        """A status line every `every_s` seconds while the server is busy (--status-interval)."""
        status = StatusLine()
        while self.engine is not None:
            line = status.line(self.engine.stats())
            if line:
                log.info("%s", line)
            await asyncio.sleep(every_s)

    async def shutdown(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # sends the spans still buffered
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.shutdown()


def browser_url(config: ServerConfig) -> str:
    """Where a browser on this machine reaches the server: a wildcard address means this machine."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(config.hostname, config.hostname)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def server_of(request: Request) -> ServerState:
    return request.app.state.server
