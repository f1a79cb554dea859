"""--api-key, --max-concurrent-requests and --cors-allow-origin."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from server import API_KEY, CLIENT_TIMEOUT_S, CORS_ORIGIN

BEARER = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def strict(strict_server):
    with httpx.Client(base_url=strict_server.url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.mark.parametrize("path, method", [("/generate", "POST"), ("/v1/chat/completions", "POST"), ("/info", "GET"),
                                          ("/metrics", "GET"), ("/openapi.json", "GET"), ("/v1/models", "GET")])
def test_missing_or_wrong_key_is_401_with_json(strict, path, method):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"api-key": "wrong"}):
        r = strict.request(method, path, headers=headers, json={})
        assert r.status_code == 401 and r.json()["error_type"] == "authentication"


def test_health_needs_no_key_and_both_key_headers_work(strict):
    assert strict.get("/health").status_code == 200
    assert strict.get("/info", headers=BEARER).status_code == 200
    assert strict.get("/info", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
    assert strict.get("/info", headers={"api-key": API_KEY}).status_code == 200


def test_keys_never_reach_the_log(strict, strict_server):
    guess = "sk-guessed-0123456789"
    strict.get("/info", headers=BEARER)
    strict.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}, headers={"api-key": guess})
    strict.get("/v1/models", headers={"authorization": f"Bearer {guess}"})
    log = strict_server.log()
    assert "/v1/models" in log  # the requests were logged, their keys not
    assert API_KEY not in log and guess not in log


def test_openai_sdk_reports_authentication_error(strict_server):
    client = openai.OpenAI(base_url=strict_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert openai.OpenAI(base_url=strict_server.url + "/v1", api_key=API_KEY).models.list().data


def test_second_request_beyond_max_concurrent_requests_is_429(strict):
    long_stream = {"prompt": "Hi", "max_tokens": 400, "min_tokens": 400, "stream": True}
    with strict.stream("POST", "/v1/completions", json=long_stream, headers=BEARER) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)  # the first request is now running
        r = strict.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}, headers=BEARER)
        assert r.status_code == 429, [line for line in lines if line][-2:]
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert int(r.headers["retry-after"]) >= 1
        r = strict.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=BEARER)
        assert r.status_code == 429 and r.json()["error"]["type"] == "overloaded" and "retry-after" in r.headers
        # decided before the body is read, as TGI does: no parsing, rendering or tokenizing when full
        r = strict.post("/generate", content=b'{"inputs": ', headers={**BEARER, "content-type": "application/json"})
        assert r.status_code == 429, r.text
    # the client closed the first stream: once the server notices, the slot is free again
    for _ in range(100):
        ok = strict.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}, headers=BEARER)
        if ok.status_code == 200:
            break
        time.sleep(0.1)
    assert ok.status_code == 200


def test_a_request_holds_its_slot_from_its_headers_on(strict, strict_server):
    """The slot is taken before the body is read, so in a burst the requests past the limit are
    refused before any admitted one's body is parsed, rendered or tokenized (bench/overload.py)."""
    body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 1}}).encode()
    head = (f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=CLIENT_TIMEOUT_S) as slow:
        slow.sendall(head.encode() + body[:10])  # the rest of the body is still on its way
        for _ in range(100):  # until the server has read the headers
            r = strict.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}, headers=BEARER)
            if r.status_code == 429:
                break
            time.sleep(0.05)
        assert r.status_code == 429 and "retry-after" in r.headers, r.text
        slow.sendall(body[10:])
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_cors(strict):
    preflight = strict.options("/v1/chat/completions", headers={
        "origin": CORS_ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
    r = strict.get("/info", headers={**BEARER, "origin": CORS_ORIGIN})
    assert r.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "access-control-allow-origin" not in strict.get("/info", headers={**BEARER, "origin": "http://evil"}).headers


def test_adapter_admin_routes_are_off_without_an_api_key(server, tmp_path):
    """They read local folders: a server anyone may call must not load them (tests/api/test_lora_routes.py
    uses them behind a key)."""
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}),
                       ("/v1/unload_lora_adapter", {"lora_name": "x"})):
        r = httpx.post(server.url + path, json=body, timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"], r.text
