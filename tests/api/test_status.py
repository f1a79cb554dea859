"""/health, /info, /metrics, the OpenAPI document and the interactive docs."""

from __future__ import annotations

from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families


def test_health_was_503_while_loading_then_200(server):
    assert server.health_statuses[0] == 503 and server.health_statuses[-1] == 200
    assert InferenceClient(model=server.url, provider="hf-inference").health_check()


def test_info_reports_the_running_config(http, server):
    info = http.get("/info?api-version=2024-05-01-preview").json()
    assert info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2047
    assert info["max_batch_total_tokens"] == 16384 and info["max_client_batch_size"] == 3
    assert info["model_dtype"] == "torch.bfloat16" and info["model_device_type"] == "cpu"
    # Azure's model_name is the served name (--served-model-name m), TGI's model_id the model's own
    assert info["model_type"] == "chat_completion" and info["model_name"] == "m" and info["model_id"].endswith(".gguf")
    assert info["model_provider_name"] and info["version"] and info["router"]
    assert http.get("/models/info").json() == info
    assert InferenceClient(model=server.url, provider="hf-inference").get_endpoint_info()["model_id"] == info["model_id"]


def test_metrics_use_tgi_names(http):
    http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 0}})
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_queue_size",
                 "tgi_batch_current_size", "tgi_request_duration", "tgi_request_queue_duration",
                 "tgi_request_inference_duration", "tgi_request_input_length", "tgi_request_generated_tokens",
                 "parley_kv_blocks_used", "parley_kv_blocks_total"):
        assert name in families, name
    failures = {s.labels["err"]: s.value for s in families["tgi_request_failure"].samples}
    assert failures["validation"] >= 1
    assert families["tgi_request_success"].samples[0].value >= 1
    assert families["parley_kv_blocks_total"].samples[0].value == 16384 / 16
    generated = {s.name: s.value for s in families["tgi_request_generated_tokens"].samples}
    assert generated["tgi_request_generated_tokens_count"] >= 1


def test_openapi_and_docs(http):
    spec = http.get("/openapi.json").json()
    for path in ("/", "/generate", "/generate_stream", "/tokenize", "/v1/chat/completions", "/v1/completions",
                 "/health", "/info", "/metrics", "/v1/models"):
        assert path in spec["paths"], path
    assert "422" in spec["paths"]["/generate"]["post"]["responses"]
    assert "swagger" in http.get("/docs").text.lower()


def test_startup_log_says_what_was_loaded_and_where(server):
    log = server.log()
    assert f"listening on http://127.0.0.1:{server.port}" in log
    assert "model ready" in log and "SmolLM2" in log and "max_total_tokens=2048" in log


def test_generated_tokens_are_counted_as_they_are_sampled(http):
    """parley_generated_tokens_total: its rate is the server's tokens/s (the playground's status panel
    and the console's status line read it)."""
    from server import metric

    before = metric(http.get("/metrics").text, "parley_generated_tokens_total")
    r = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5, "stop": [], "details": True}})
    generated = r.json()["details"]["generated_tokens"]
    assert 1 <= generated <= 5
    assert metric(http.get("/metrics").text, "parley_generated_tokens_total") == before + generated


def test_time_to_first_token_is_observed_once_per_request_streamed_or_not(http):
    from server import metric

    def observed() -> float:
        return metric(http.get("/metrics").text, "parley_time_to_first_token_count")

    before = observed()
    http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                            "stream": True, "n": 2, "temperature": 1})
    http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 0}})  # refused: no token
    assert observed() == before + 2
