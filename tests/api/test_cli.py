"""`parley serve` flags and their environment variables -> EngineConfig / ServerConfig."""

from __future__ import annotations

import pytest

from parley.cli import build_parser, configs


def parse(*argv: str):
    return configs(build_parser().parse_args(["serve", *argv]))


def test_defaults():
    engine, server = parse()
    assert (server.hostname, server.port, server.api_key, server.cors_allow_origin) == ("127.0.0.1", 8080, None, ())
    assert engine.model_id is None and engine.max_concurrent_requests == 128


def test_flags_mirror_tgi_launcher(tmp_path):
    engine, server = parse(
        "--model-id", str(tmp_path), "--hostname", "0.0.0.0", "--port", "9000", "--max-concurrent-requests", "3",
        "--max-input-tokens", "100", "--max-total-tokens", "200", "--max-batch-prefill-tokens", "64",
        "--max-batch-total-tokens", "4096", "--max-best-of", "2", "--max-stop-sequences", "6",
        "--max-client-batch-size", "8", "--api-key", "k", "--cors-allow-origin", "http://a,http://b",
        "--cors-allow-origin", "http://c", "--dtype", "float32", "--num-threads", "2", "--device", "cpu")
    assert (engine.model_id, engine.dtype, engine.device, engine.num_threads) == (str(tmp_path), "float32", "cpu", 2)
    assert (engine.max_concurrent_requests, engine.max_input_tokens, engine.max_total_tokens) == (3, 100, 200)
    assert (engine.max_batch_prefill_tokens, engine.max_batch_total_tokens) == (64, 4096)
    assert (engine.max_best_of, engine.max_stop_sequences) == (2, 6)
    assert (server.hostname, server.port, server.max_client_batch_size, server.api_key) == ("0.0.0.0", 9000, 8, "k")
    assert server.cors_allow_origin == ("http://a", "http://b", "http://c")


def test_environment_variables_and_flags_win(monkeypatch):
    monkeypatch.setenv("PORT", "7000")
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "300")
    monkeypatch.setenv("API_KEY", "from-env")
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", "http://x")
    engine, server = parse("--port", "7001")
    assert server.port == 7001 and engine.max_total_tokens == 300
    assert server.api_key == "from-env" and server.cors_allow_origin == ("http://x",)


def test_adapt_threads_flag(monkeypatch):
    assert parse()[0].adapt_threads is True
    assert parse("--adapt-threads", "false")[0].adapt_threads is False
    monkeypatch.setenv("ADAPT_THREADS", "0")
    assert parse()[0].adapt_threads is False
    assert parse("--adapt-threads", "yes")[0].adapt_threads is True
    with pytest.raises(SystemExit):
        parse("--adapt-threads", "sometimes")


def test_served_model_names(monkeypatch):
    assert parse()[1].served_model_names == ()  # the model's id (api/state.py)
    assert parse("--served-model-name", "a", "--served-model-name", "b/c")[1].served_model_names == ("a", "b/c")
    monkeypatch.setenv("SERVED_MODEL_NAME", "x,y")
    assert parse()[1].served_model_names == ("x", "y")
    assert parse("--served-model-name", "z")[1].served_model_names == ("z",)


def test_reasoning_format_flag(monkeypatch):
    assert parse()[1].reasoning_format == "auto"
    assert parse("--reasoning-format", "none")[1].reasoning_format == "none"
    monkeypatch.setenv("REASONING_FORMAT", "none")
    assert parse()[1].reasoning_format == "none"
    with pytest.raises(SystemExit):
        parse("--reasoning-format", "deepseek")


def test_unknown_fields_flag(monkeypatch):
    assert parse()[1].unknown_fields == "refuse"
    assert parse("--unknown-fields", "ignore")[1].unknown_fields == "ignore"
    monkeypatch.setenv("UNKNOWN_FIELDS", "ignore")
    assert parse()[1].unknown_fields == "ignore"
    with pytest.raises(SystemExit):  # argparse's usage error, naming the choices
        parse("--unknown-fields", "sometimes")


def test_serve_exits_with_an_error_when_the_model_cannot_load(tmp_path):
    import subprocess
    import sys

    from server import free_port

    missing = tmp_path / "no-such-model"
    done = subprocess.run([sys.executable, "-m", "parley", "serve", "--model-id", str(missing), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "model failed to load" in done.stderr and str(missing) in done.stderr


def test_sigterm_drains_requests_in_flight_then_exits_0(tmp_path):
    """SIGTERM: the stream in flight runs to its end, /health and new requests get 503 meanwhile, and
    the process exits 0 once it is done (the real CLI around the fake engine, 3 ms a token)."""
    import signal
    import sys
    import threading
    from pathlib import Path

    import httpx

    from server import CLIENT_TIMEOUT_S, ServerProcess

    fake = Path(__file__).parent / "fake_server.py"
    proc = ServerProcess([sys.executable, str(fake), "serve"], tmp_path / "server.log").start()
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 600}}
    events, during = [], {}
    try:
        with httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT_S) as http, \
                http.stream("POST", "/generate_stream", json=body) as stream:
            lines = stream.iter_lines()
            events.append(next(line for line in lines if line))  # the stream is running
            proc.proc.send_signal(signal.SIGTERM)

            def probe():  # from a second connection while the stream drains
                with httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT_S) as other:
                    for _ in range(200):
                        health = other.get("/health")
                        if health.status_code == 503:
                            break
                    during["health"] = health.status_code
                    during["generate"] = other.post("/generate", json={"inputs": "Hi"}).status_code

            prober = threading.Thread(target=probe)
            prober.start()
            events.extend(line for line in lines if line)
            prober.join(timeout=CLIENT_TIMEOUT_S)
        assert proc.proc.wait(timeout=CLIENT_TIMEOUT_S) == 0, proc.log()[-2000:]
    finally:
        proc.stop()
    assert during == {"health": 503, "generate": 503}
    assert len(events) == 600 and '"generated_text"' in events[-1]  # every token, and the final event


def test_playground_flag(monkeypatch):
    assert parse()[1].playground is True
    assert parse("--no-playground")[1].playground is False
    monkeypatch.setenv("NO_PLAYGROUND", "1")
    assert parse()[1].playground is False
    monkeypatch.setenv("NO_PLAYGROUND", "false")
    assert parse()[1].playground is True
    monkeypatch.setenv("NO_PLAYGROUND", "maybe")
    with pytest.raises(ValueError, match="NO_PLAYGROUND='maybe': expected true or false"):
        parse()


def test_status_interval_flag(monkeypatch):
    assert parse()[1].status_interval == 10.0
    assert parse("--status-interval", "0")[1].status_interval == 0.0
    monkeypatch.setenv("STATUS_INTERVAL", "2.5")
    assert parse()[1].status_interval == 2.5
    with pytest.raises(ValueError, match="--status-interval must be 0"):
        parse("--status-interval", "-1")


def test_otlp_flags(monkeypatch):
    assert (parse()[1].otlp_endpoint, parse()[1].otlp_service_name) == (None, "parley")
    server = parse("--otlp-endpoint", "http://c:4318", "--otlp-service-name", "p")[1]
    assert (server.otlp_endpoint, server.otlp_service_name) == ("http://c:4318", "p")
    monkeypatch.setenv("OTLP_ENDPOINT", "http://env:4318")
    assert parse()[1].otlp_endpoint == "http://env:4318"


def test_a_setting_that_cannot_work_stops_serve_at_once_saying_why():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "parley", "serve", "--otlp-endpoint", "collector:4317"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--otlp-endpoint must be an http(s) URL" in done.stderr


def test_speculate_flag(monkeypatch):
    assert parse()[0].speculate == 0
    assert parse("--speculate", "4")[0].speculate == 4
    monkeypatch.setenv("SPECULATE", "2")  # TGI's launcher reads it too
    assert parse()[0].speculate == 2
