"""--otlp-endpoint: a real server (the CLI around the fake engine) sends each request's trace to
an OTLP/HTTP collector, here a small HTTP server in the test that keeps what it is sent."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from server import CLIENT_TIMEOUT_S, ServerProcess

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                                    reason="the otel extra is not installed (pip install 'parley[otel]')")

HERE = Path(__file__).parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_each_request_is_sent_as_a_trace_with_its_phases(tmp_path):
    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    proc = ServerProcess([sys.executable, str(HERE / "fake_server.py"), "serve", "--otlp-endpoint", endpoint,
                          "--otlp-service-name", "parley-test"], tmp_path / "server.log").start()
    try:
        r = httpx.post(proc.url + "/v1/chat/completions", timeout=CLIENT_TIMEOUT_S,
                       headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
                             "user": "u1"})
        assert r.status_code == 200
    finally:
        proc.stop()  # the spans still buffered are sent on shutdown
        collector.shutdown()
    spans, services = [], set()
    for path, body in Collector.received:
        assert path == "/v1/traces"
        request = trace_service.ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"}
            spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert services == {"parley-test"}
    assert sorted(s.name for s in spans) == ["decode", "parley.request /v1/chat/completions", "prefill", "queue"]
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    (root,) = [s for s in spans if s.name.startswith("parley.request")]
    assert {a.key: a.value.string_value for a in root.attributes}["enduser.id"] == "u1"  # the request's user
