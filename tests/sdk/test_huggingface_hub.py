"""huggingface_hub: `InferenceClient(base_url=URL)` for chat; `InferenceClient(model=URL,
provider="hf-inference")` for text_generation and the endpoint's info."""

from __future__ import annotations

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, ValidationError

from sdk_common import (CITY_SCHEMA, JSON_MESSAGES, KEY, MESSAGES, SAMPLED, WEATHER_MESSAGES, WEATHER_TOOL,
                        assert_city_json, assert_weather_call)

pytestmark = pytest.mark.slow


@pytest.fixture
def client(server):
    return InferenceClient(base_url=server.url, api_key=KEY)


@pytest.fixture
def endpoint(server):
    return InferenceClient(model=server.url, token=KEY, provider="hf-inference")


def test_chat(client):
    r = client.chat_completion(MESSAGES, max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_chat_stream(client):
    chunks = list(client.chat_completion(MESSAGES, max_tokens=4, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == client.chat_completion(MESSAGES, max_tokens=4, temperature=0).choices[0].message.content


def test_n_and_seed(client):
    first, again = (client.chat_completion(MESSAGES, n=2, seed=7, **SAMPLED) for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_stop(client, endpoint):
    text = client.chat_completion(MESSAGES, max_tokens=8, temperature=0).choices[0].message.content
    r = client.chat_completion(MESSAGES, max_tokens=8, temperature=0, stop=[text[3:5]])
    assert r.choices[0].message.content == text[: text.index(text[3:5])] and r.choices[0].finish_reason == "stop"
    full = endpoint.text_generation("The capital of France is", max_new_tokens=8)
    stopped = endpoint.text_generation("The capital of France is", max_new_tokens=8, stop=[full[3:5]], details=True)
    assert stopped.details.finish_reason == "stop_sequence" and stopped.generated_text.startswith(full[:3])


def test_json_response_format(client):
    """The SDK rewrites json_schema to {"type": "json_object", "value": schema} (SDK-WIRE §1.4)."""
    r = client.chat_completion(JSON_MESSAGES, max_tokens=30, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
    assert_city_json(r.choices[0].message.content)


def test_required_tool_call(client):
    r = client.chat_completion(WEATHER_MESSAGES, max_tokens=60, temperature=0, tools=[WEATHER_TOOL],
                               tool_choice="required", extra_body={"parallel_tool_calls": False})
    call = r.choices[0].message.tool_calls[0]
    assert_weather_call(call.function.name, call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"


def test_model_info(endpoint):
    info = endpoint.get_endpoint_info()
    assert info["model_id"] and info["max_total_tokens"] == 2048
    assert endpoint.health_check()


def test_bad_request(client, endpoint):
    with pytest.raises(HfHubHTTPError) as err:
        client.chat_completion(MESSAGES, max_tokens=2, temperature=5)
    assert err.value.response.status_code == 422
    with pytest.raises(ValidationError, match="stop"):  # the server's TGI-style error, mapped by error_type
        endpoint.text_generation("Hello", max_new_tokens=2, stop=["a", "b", "c", "d", "e"])
