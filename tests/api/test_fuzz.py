"""Property-based fuzzing of Parley's own OpenAPI document (schemathesis) against a real server on a
tiny random model: whatever a client sends, fitting the schema or breaking it, the answer is never a
5xx, every 4xx is a JSON error body in its route's dialect, and every answer's status, content type
and body are the ones the document declares. Bounded: 50 examples per operation and mode, the same
ones on every run, and no deadline (the machine may be busy). It found the OpenAPI document
declaring JSON for /health's empty 200 and /metrics' text, and no 403 for the LoRA admin routes."""

from __future__ import annotations

import sys

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from server import ServerProcess
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow

EXAMPLES = 50  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("fuzz_model"))
    # a short context: the fuzzer asks for any number of tokens, and answers must come back quickly
    proc = ServerProcess([sys.executable, "-m", "parley", "serve", "--model-id", model, "--dtype", "float32",
                          "--num-threads", "1", "--max-total-tokens", "256", "--max-batch-total-tokens", "4096"],
                         tmp_path_factory.mktemp("fuzz_server") / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    config = schemathesis.Config()
    # bodies that fit the schema and bodies that break it; the same examples on every run
    config.projects.default.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                              max_examples=EXAMPLES, deterministic=True, database="none")
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


def json_error_body(ctx, response, case) -> None:
    """A 4xx carries the route's error shape: TGI's {"error": str, "error_type"}, OpenAI's
    {"error": {"message", "type", "param", "code"}, "error_type"} or Anthropic's {"type": "error",
    "error": {"type", "message"}, "error_type"}."""
    if not 400 <= response.status_code < 500:
        return None
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error_type"), str), body
    error = body["error"]
    if body.get("type") == "error":
        assert case.path.startswith("/v1/messages") and {"message", "type"} <= set(error), body
    elif isinstance(error, dict):
        assert {"message", "type", "param", "code"} <= set(error), body
    else:
        assert isinstance(error, str), body
    return None


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_no_input_gives_a_server_error(case):
    response = case.call(timeout=120)
    case.validate_response(response, checks=[not_a_server_error, json_error_body, response_schema_conformance,
                                             status_code_conformance, content_type_conformance])
