"""Every invalid request gets a JSON error body in its route's dialect, naming the field and rule.

The default server runs with --max-total-tokens 2048 (so max_input_tokens 2047), max_stop_sequences
4, max_best_of 4, --max-client-batch-size 3.
"""

from __future__ import annotations

import re

import openai
import pytest
import text_generation.errors
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError
from text_generation import Client

LONG = "hello " * 2100


def tgi_error(http, body, path="/generate") -> str:
    r = http.post(path, json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["error_type"] == "validation" and isinstance(payload["error"], str)
    return payload["error"]


def openai_error(http, body, path="/v1/chat/completions") -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["error_type"] == "validation"
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["type"] == "validation"
    return payload["error"]


@pytest.mark.parametrize("parameters, words", [
    ({"max_new_tokens": 5000}, ["max_new_tokens", "2048"]),
    ({"max_new_tokens": 0}, ["max_new_tokens"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, ["stop", "4"]),
    ({"best_of": 5, "do_sample": True}, ["best_of", "4"]),
    ({"best_of": 2}, ["best_of", "sampling"]),
    ({"best_of": 2, "do_sample": True, "seed": 3}, ["seed", "best_of"]),
    ({"temperature": 0}, ["temperature", "greater than 0"]),
    ({"top_p": 1.5}, ["top_p", "less than or equal to 1"]),
    ({"top_k": 0}, ["top_k"]),
    ({"repetition_penalty": 0}, ["repetition_penalty"]),
    ({"max_new_tokens": "many"}, ["max_new_tokens", "integer"]),
    ({"grammar": {"type": "yaml", "value": "x"}}, ["grammar.type"]),
])
def test_tgi_parameter_rules(http, parameters, words):
    message = tgi_error(http, {"inputs": "Hi", "parameters": parameters})
    assert all(w in message for w in words), message


def test_tgi_input_rules(http):
    assert "2047" in tgi_error(http, {"inputs": LONG, "parameters": {"max_new_tokens": 1}})
    assert "inputs" in tgi_error(http, {"inputs": ""})
    assert "inputs" in tgi_error(http, {"parameters": {}})
    assert "inputs" in tgi_error(http, {"inputs": 5})
    stream = {"inputs": "Hi", "stream": True}
    assert "best_of" in tgi_error(http, {**stream, "parameters": {"best_of": 2, "do_sample": True}}, path="/")
    assert "decoder_input_details" in tgi_error(http, {"inputs": "Hi", "parameters": {"decoder_input_details": True}},
                                                path="/generate_stream")


def test_malformed_json(http):
    r = http.post("/generate", content=b'{"inputs": "Hi",', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json() == {"error": r.json()["error"], "error_type": "validation"}
    assert "Malformed JSON" in r.json()["error"]
    r = http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Malformed JSON" in r.json()["error"]["message"]


def post_raw(http, path, text: str):
    """`text` sent as is: Python's json would not write lone surrogates or NaN as the client did."""
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, body, field", [
    ("/generate", '{"inputs": "Hi \\ud800 there"}', "`inputs`"),
    ("/tokenize", '{"inputs": "\\udfff"}', "`inputs`"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b\\ud83d"}]}',
     "`messages.1.content`"),
    ("/v1/completions", '{"prompt": ["ok", "x\\ud800"], "max_tokens": 1}', "`prompt.1`"),
])
def test_a_lone_surrogate_is_a_422_naming_the_field(http, path, body, field):
    # valid JSON escapes that stand for no character: the tokenizer failed on them with a 500
    r = post_raw(http, path, body)
    assert r.status_code == 422, r.text
    message = r.json()["error"] if path in ("/generate", "/tokenize") else r.json()["error"]["message"]
    assert field in message and "surrogate" in message, message
    paired = re.sub(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}", r"\\ud83d\\ude00", body)  # a real pair is fine
    assert post_raw(http, path, paired).status_code == 200, paired


@pytest.mark.parametrize("body", ['{"inputs": "Hi", "parameters": {"temperature": NaN, "do_sample": true}}',
                                  '{"inputs": "Hi", "parameters": {"top_p": Infinity}}',
                                  '{"inputs": ' + "[" * 3000 + "]" * 3000 + "}"])
def test_non_json_numbers_and_deep_nesting_are_422(http, body):
    r = post_raw(http, "/generate", body)
    assert r.status_code == 422 and "Malformed JSON" in r.json()["error"], r.text


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/tokenize"])
def test_a_body_past_the_payload_limit_is_413(http, path):
    huge = b'{"inputs": "' + b"a" * 2_000_001 + b'"}'  # the default --payload-limit: 2,000,000 bytes, as TGI
    r = http.post(path, content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "payload" in r.text.lower(), r.text[:300]
    # no Content-Length to refuse it by: counted while it arrives
    r = http.post(path, content=iter([huge[:1_000_000], huge[1_000_000:]]), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    body = r.json()
    message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert body["error_type"] == "payload_too_large" and message.startswith("Payload too large"), body


def test_seeds_are_u64(http):
    assert "seed" in tgi_error(http, {"inputs": "Hi", "parameters": {"seed": 2**64, "do_sample": True}})
    for seed in (2**64, -1):
        error = openai_error(http, {"messages": [{"role": "user", "content": "Hi"}], "seed": seed, "max_tokens": 1})
        assert error["param"] == "seed", error
    body = {"inputs": "Hi", "parameters": {"seed": 2**64 - 1, "do_sample": True, "max_new_tokens": 1}}
    assert http.post("/generate", json=body).json()["details"]["seed"] == 2**64 - 1


CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "tool_call_id": "call_1", "content": "42"}], "messages.0"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
      {"role": "tool", "tool_call_id": "call_1", "content": "42"}], "messages.2"),
    ([{"role": "user", "content": "Hi"}, CALL, {"role": "tool", "tool_call_id": "call_9", "content": "42"}],
     "messages.2.tool_call_id"),
])
def test_a_tool_result_must_answer_a_tool_call(http, messages, param):
    error = openai_error(http, {"messages": messages, "max_tokens": 1})
    assert error["param"] == param and "tool" in error["message"], error


def test_tool_results_answering_the_calls_before_them_are_served(http):
    two_calls = {**CALL, "tool_calls": CALL["tool_calls"] + [{**CALL["tool_calls"][0], "id": "call_2"}]}
    results = [{"role": "tool", "tool_call_id": i, "content": "42"} for i in ("call_2", "call_1")]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}, two_calls, *results],
                                                "max_tokens": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", ["messages", "at least 1"]),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role", ["role"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "temperature": 3}, "temperature", ["less than or equal to 2"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}, "top_p", ["greater than 0"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_k": -1}, "top_k", ["greater than or equal to 0"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 100}, "n", ["16"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"abc": 1}}, "logit_bias", ["token ids"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000}, "max_tokens", ["2048", "`max_tokens`"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 5000}, "max_completion_tokens",
     ["2048", "`max_completion_tokens`", "`messages` tokens"]),
    ({"messages": [{"role": "user", "content": LONG}], "max_tokens": 1}, "messages", ["2047", "`messages`"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     ["image"]),
    ({"messages": "Hi"}, "messages", ["list"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, "top_logprobs", ["`logprobs`"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "stream_options": {"include_usage": True}}, "stream_options",
     ["`stream`"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", "json_schema": {
        "strict": True, "schema": {"type": "object", "additionalProperties": True}}}},
     "response_format.json_schema.schema.additionalProperties", ["strict mode"]),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "object", "additionalProperties": {"type": "string"}}}}]},
     "tools[0].function.parameters.additionalProperties", ["strict mode"]),
])
def test_chat_rules(http, body, param, words):
    error = openai_error(http, body)
    assert error["param"] == param and all(w in error["message"] for w in words), error
    # the engine's own names for the body's fields never reach a chat client
    assert not any(f"`{name}`" in error["message"] for name in ("max_new_tokens", "inputs", "top_n_tokens")), error


def test_completions_errors_name_the_completions_fields(http):
    error = openai_error(http, {"prompt": "Hi", "max_tokens": 5000}, path="/v1/completions")
    assert error["param"] == "max_tokens" and "`max_tokens`" in error["message"], error
    error = openai_error(http, {"prompt": LONG, "max_tokens": 1}, path="/v1/completions")
    assert error["param"] == "prompt" and "`prompt`" in error["message"] and "`inputs`" not in error["message"], error


@pytest.mark.parametrize("prompt", [[49152], [1, -1], [[1, 2], []], [1, 2.5], [1, True], ["a", 1]])
def test_completions_refuse_what_is_no_prompt_of_this_model(http, prompt):
    error = openai_error(http, {"prompt": prompt, "max_tokens": 1}, path="/v1/completions")
    assert error["param"].split(".")[0] == "prompt" and "`prompt" in error["message"], error


def test_completions_batch_limit(http):
    error = openai_error(http, {"prompt": ["a", "b", "c", "d"], "max_tokens": 1}, path="/v1/completions")
    assert error["param"] == "prompt" and "max_client_batch_size" in error["message"] and "3" in error["message"]


def test_nulls_accepted_everywhere(http):
    fields = ["model", "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
              "n", "seed", "stop", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias",
              "stream", "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format"]
    body = {**dict.fromkeys(fields), "messages": [{"role": "user", "content": "Hi", "name": None, "tool_calls": None}]}
    body["max_tokens"] = 1
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_sdks_raise_their_validation_errors(server):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5000)
    assert "max_tokens" in e.value.message and "max_new_tokens" not in e.value.message
    with pytest.raises(text_generation.errors.ValidationError):
        Client(server.url).generate("Hi", max_new_tokens=0)  # not checked by the client itself
    with pytest.raises(HubValidationError):
        InferenceClient(model=server.url, provider="hf-inference").text_generation("Hi", max_new_tokens=5000)


def test_unknown_route_and_method(http):
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = http.get("/generate")
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed"
    r = http.post("/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


# -- engine failures (fake engine: a real model cannot be made to fail on demand) ---------------
def test_engine_failure_before_output_is_424(fake_server):
    import httpx

    r = httpx.post(fake_server.url + "/generate", json={"inputs": "FAIL_AFTER_0"})
    assert r.status_code == 424 and r.json() == {"error": "the fake engine failed as asked", "error_type": "generation"}
    r = httpx.post(fake_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "FAIL_AFTER_0"}], "stream": True})
    assert r.status_code == 424 and r.json()["error"]["type"] == "generation"


def test_engine_failure_mid_stream_is_an_sse_event(fake_server):
    import json

    import httpx

    from server import sse_events

    with httpx.stream("POST", fake_server.url + "/generate_stream",
                      json={"inputs": "FAIL_AFTER_3", "parameters": {"max_new_tokens": 10}}) as r:
        events = [json.loads(e) for e in sse_events(r)]
    assert len(events) == 4 and events[-1] == {"error": "the fake engine failed as asked", "error_type": "generation"}
    with httpx.stream("POST", fake_server.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "FAIL_AFTER_3"}], "stream": True}) as r:
        events = sse_events(r)
    assert json.loads(events[-1])["error"]["message"] == "the fake engine failed as asked"
    metrics = httpx.get(fake_server.url + "/metrics").text
    assert 'tgi_request_failure{err="generation"} 4' in metrics
