"""parley/observability/tracing.py: a request's life as OpenTelemetry spans (queue, prefill,
decode), in the caller's trace when it sends a traceparent. Spans go to an in-memory exporter here;
tests/api/test_tracing_export.py sends them over OTLP/HTTP from a real server."""

from __future__ import annotations

import sys
import time

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed (pip install 'parley[otel]')")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402

from parley.observability.metrics import Metrics  # noqa: E402
from parley.observability.tracing import Tracing, traces_url  # noqa: E402
from parley.types import FinalEvent, FinishReason  # noqa: E402

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    metrics = Metrics(tracing=Tracing("http://127.0.0.1:4318", exporter=exporter))
    return metrics, exporter


def final(index=0, queue_s=0.002, cached=16) -> FinalEvent:
    return FinalEvent(index=index, finish_reason=FinishReason.LENGTH, text="hi", generated_tokens=3, prompt_tokens=40,
                      seed=None, queue_s=queue_s, inference_s=0.01, cached_tokens=cached)


def test_a_request_is_a_root_span_with_queue_prefill_and_decode_in_the_callers_trace(spans):
    metrics, exporter = spans
    record = metrics.record_request("/v1/chat/completions", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    record.user = "u1"  # what EngineCall reads off the request
    time.sleep(0.01)  # the first token comes after the first step (2 ms after arrival, the FinalEvent says)
    record.first_token()
    record.succeeded([[final(0), final(1, queue_s=0.003)]])
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(by_name) == ["decode", "parley.request /v1/chat/completions", "prefill", "queue"]
    root = by_name.pop("parley.request /v1/chat/completions")
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.parent.span_id:016x}" == PARENT_ID
    assert dict(root.attributes) == {"http.route": "/v1/chat/completions", "parley.outcome": "success",
                                     "parley.prompt_tokens": 40, "parley.generated_tokens": 6,
                                     "parley.cached_tokens": 16, "parley.finish_reason": "length", "enduser.id": "u1"}
    assert root.status.status_code is StatusCode.UNSET
    queue, prefill, decode = by_name["queue"], by_name["prefill"], by_name["decode"]
    assert all(s.parent.span_id == root.context.span_id for s in (queue, prefill, decode))
    assert root.start_time == queue.start_time and queue.end_time - queue.start_time == 2_000_000  # the first step
    assert queue.end_time == prefill.start_time <= prefill.end_time == decode.start_time <= decode.end_time == root.end_time
    assert root.resource.attributes["service.name"] == "parley"


def test_without_a_traceparent_each_request_is_its_own_trace(spans):
    metrics, exporter = spans
    for _ in range(2):
        metrics.record_request("/generate").succeeded([[final()]])
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert len(roots) == 2 and roots[0].context.trace_id != roots[1].context.trace_id


def test_a_cancelled_or_failed_request_has_an_error_status_and_the_spans_its_times_allow(spans):
    metrics, exporter = spans
    record = metrics.record_request("/generate_stream")
    record.first_token()
    record.cancelled()
    names = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(names) == ["decode", "parley.request /generate_stream"]  # no FinalEvent: first step unknown
    root = names["parley.request /generate_stream"]
    assert root.status.status_code is StatusCode.ERROR and root.status.description == "cancelled"
    exporter.clear()
    metrics.record_request("/generate").failed("validation")
    (root,) = exporter.get_finished_spans()
    assert root.attributes["parley.outcome"] == "validation" and root.status.status_code is StatusCode.ERROR


def test_no_tracing_records_nothing():
    record = Metrics().record_request("/generate", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    record.first_token()
    record.succeeded([[final()]])  # and no error for the missing tracer


def test_the_collector_url(monkeypatch):
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://x/otlp/v1/traces") == "https://x/otlp/v1/traces"
    with pytest.raises(ValueError, match="http"):
        traces_url("collector:4317")


def test_without_the_extra_the_flag_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'parley\[otel\]'"):
        Tracing("http://127.0.0.1:4318")
