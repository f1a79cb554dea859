"""OpenTelemetry tracing of a generation request's life, sent over OTLP/HTTP (`--otlp-endpoint`).

Optional: it needs the `otel` extra (`pip install 'parley[otel]'`); without the flag nothing here
imports OpenTelemetry. Each generation request becomes one trace, or joins the caller's when the
request carries a W3C `traceparent` header:

    parley.request   arrival -> last byte    http.route, parley.outcome, token counts, finish reason,
                                             enduser.id (the request's user, when it names one)
      queue          arrival -> the engine's first step for it
      prefill        that step -> the first generated token
      decode         the first token -> the end

The spans are written when the request ends, from the times metrics.RequestRecord keeps (the
engine's FinalEvent says how long the request queued), so tracing adds nothing to the engine's
loop. A request that failed or was cancelled gets the spans its times allow, and an error status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

OTEL_EXTRA = "pip install 'parley[otel]'"


class Tracing:
    """A tracer whose spans go to `endpoint` (an OTLP/HTTP collector, e.g. http://127.0.0.1:4318;
    `/v1/traces` is added unless the URL has a path)."""

    def __init__(self, endpoint: str, service_name: str = "parley", exporter: Any = None):
        try:
            from opentelemetry.propagate import extract
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.trace import Status, StatusCode, set_span_in_context
        except ImportError as exc:
            raise RuntimeError(f"--otlp-endpoint needs OpenTelemetry, which is not installed: {OTEL_EXTRA}") from exc
        self._extract, self._status, self._error, self._inside = extract, Status, StatusCode.ERROR, set_span_in_context
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is None:  # the real one; tests hand an in-memory exporter, exported at once
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("parley")

    def parent(self, headers: Mapping[str, str] | None):
        """The caller's trace context (W3C traceparent), or None."""
        return self._extract(dict(headers)) if headers else None

    def record(self, life: "RequestLife") -> None:
        root = self.tracer.start_span(f"parley.request {life.route}".strip(), context=life.parent,
                                      start_time=life.arrival_ns, attributes=life.attributes())
        if life.outcome != "success":
            root.set_status(self._status(self._error, life.outcome))
        inside = self._inside(root)
        for name, start, end in life.phases():
            self.tracer.start_span(name, context=inside, start_time=start).end(end_time=end)
        root.end(end_time=life.end_ns)

    def shutdown(self) -> None:
        """Sends what is still buffered."""
        self.provider.shutdown()


def traces_url(endpoint: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f"--otlp-endpoint must be an http(s) URL of an OTLP/HTTP collector, not {endpoint!r}")
    return endpoint if "/" in rest.rstrip("/") else endpoint.rstrip("/") + "/v1/traces"


@dataclass
class RequestLife:
    """When one request's phases began and ended (wall-clock ns), as RequestRecord saw them."""

    route: str
    parent: Any
    arrival_ns: int
    end_ns: int
    outcome: str  # "success", "cancelled", or the error type
    first_step_ns: int | None = None
    first_token_ns: int | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    user: str | None = None

    def attributes(self) -> dict:
        values = {"http.route": self.route, "parley.outcome": self.outcome, "enduser.id": self.user,
                  "parley.prompt_tokens": self.prompt_tokens, "parley.generated_tokens": self.generated_tokens,
                  "parley.cached_tokens": self.cached_tokens, "parley.finish_reason": self.finish_reason}
        return {k: v for k, v in values.items() if v is not None}

    def phases(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of the phases whose bounds are known: a request cancelled before its
        end has no FinalEvent to say when its first step ran, so no queue or prefill span."""
        phases = []
        if self.first_step_ns is not None:
            phases.append(("queue", self.arrival_ns, self.first_step_ns))
            phases.append(("prefill", self.first_step_ns, self.first_token_ns or self.end_ns))
        if self.first_token_ns is not None:
            phases.append(("decode", self.first_token_ns, self.end_ns))
        return phases
