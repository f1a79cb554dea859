"""anthropic: `Anthropic(base_url=URL, api_key=KEY)`; the SDK posts to /v1/messages with `x-api-key`.
Sampling parameters the SDK no longer declares (temperature, top_k) go in `extra_body`."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from sdk_common import CITY_SCHEMA, KEY, MESSAGES, WEATHER_FUNCTION, assert_city_json, assert_weather_call

pytestmark = pytest.mark.slow
GREEDY = {"extra_body": {"temperature": 0}}
QUESTION = MESSAGES[0]["content"]
WEATHER = {"name": WEATHER_FUNCTION["name"], "description": WEATHER_FUNCTION["description"],
           "input_schema": WEATHER_FUNCTION["parameters"]}


@pytest.fixture
def client(server):
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0) as c:
        yield c


def test_a_message_is_the_same_answer_as_the_chat_completion(client, server):
    r = client.messages.create(model="m", max_tokens=6, messages=MESSAGES, **GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.model == "m" and r.id.startswith("msg_")
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None and r.usage.output_tokens == 6
    chat = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": "m", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}).json()
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == chat["choices"][0]["message"]["content"]
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
    # the system prompt reaches the template, and count_tokens counts what create would
    system = "Answer in French."
    counted = client.messages.count_tokens(model="m", system=system, messages=MESSAGES).input_tokens
    assert counted == client.messages.create(model="m", max_tokens=1, system=system, messages=MESSAGES).usage.input_tokens
    assert counted > r.usage.input_tokens - 30  # SmolLM2's template adds its own system prompt only without one
    # cache_control is accepted anywhere Anthropic takes it: the same answer (prefix sharing is always on)
    cached = [{"role": "user", "content": [{"type": "text", "text": QUESTION, "cache_control": {"type": "ephemeral"}}]}]
    again = client.messages.create(model="m", max_tokens=6, messages=cached, cache_control={"type": "ephemeral"}, **GREEDY)
    assert again.content[0].text == r.content[0].text


def test_metadata_user_id_is_taken(client):
    plain = client.messages.create(model="m", max_tokens=4, messages=MESSAGES, **GREEDY)
    named = client.messages.create(model="m", max_tokens=4, messages=MESSAGES, metadata={"user_id": "u1"}, **GREEDY)
    assert named.content[0].text == plain.content[0].text


def test_a_tool_results_is_error_reaches_the_template(client):
    def counted(is_error: bool) -> int:
        call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "timeout", "is_error": is_error}
        messages = [*MESSAGES, {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}]
        return client.messages.count_tokens(model="m", tools=[WEATHER], messages=messages).input_tokens

    assert counted(True) > counted(False)  # "Error: " before its content


def test_the_stream_is_anthropics_named_events_in_order(client, server):
    whole = client.messages.create(model="m", max_tokens=6, messages=MESSAGES, **GREEDY)
    with client.messages.stream(model="m", max_tokens=6, messages=MESSAGES, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text and final.stop_reason == "max_tokens" and final.usage.output_tokens == 6
    assert final.usage.input_tokens == whole.usage.input_tokens
    raw = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                     json={"model": "m", "max_tokens": 3, "messages": MESSAGES, "stream": True, "temperature": 0})
    frames = [f for f in raw.text.split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * (len(names) - 5),
                     "content_block_stop", "message_delta", "message_stop"], names
    assert all(f'"type":"{name}"' in frame for name, frame in zip(names, frames))


def test_a_stop_sequence_is_named_where_it_stopped(client):
    text = client.messages.create(model="m", max_tokens=12, messages=MESSAGES, **GREEDY).content[0].text
    stop = text[6:9]
    r = client.messages.create(model="m", max_tokens=12, messages=MESSAGES, stop_sequences=["zzz", stop], **GREEDY)
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop) and stop not in r.content[0].text


def test_tool_use_and_its_result(client):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model="m", max_tokens=60, tools=[WEATHER], messages=question,
                  tool_choice={"type": "any", "disable_parallel_tool_use": True}, **GREEDY)
    r = client.messages.create(**kwargs)
    (call,) = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use"
    assert_weather_call(call.name, call.input)
    with client.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [(b.type, getattr(b, "input", None))
                                                                                for b in r.content]
    answer = client.messages.create(model="m", max_tokens=8, tools=[WEATHER], **GREEDY, messages=[
        *question, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                      "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C"}]}])
    assert answer.content and answer.usage.input_tokens > r.usage.input_tokens


def test_output_config_format_is_structured_output(client):
    r = client.messages.create(model="m", max_tokens=40, output_config={"format": {"type": "json_schema", "schema": CITY_SCHEMA}},
                               messages=[{"role": "user", "content": "Give the capital of France as JSON."}], **GREEDY)
    assert_city_json(r.content[0].text)


def test_errors_take_anthropics_shape(client, server):
    with pytest.raises(anthropic.NotFoundError, match="`claude-sonnet-4` does not exist"):
        client.messages.create(model="claude-sonnet-4", max_tokens=4, messages=MESSAGES)
    with pytest.raises(anthropic.BadRequestError, match="`metadata.tags`"):  # only user_id has an effect here
        client.messages.create(model="m", max_tokens=4, messages=MESSAGES, metadata={"user_id": "u", "tags": "x"})
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError, match="messages"):
        client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model="m", max_tokens=4, messages=MESSAGES, extra_body={"temperature": 1.5})
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}
    with pytest.raises(anthropic.BadRequestError, match="`messages.0.content`: tool_result 'toolu_x' answers no tool_use"):
        client.messages.create(model="m", max_tokens=4, system="Be brief.", messages=[result])  # its index, not the chat's
    with pytest.raises(anthropic.BadRequestError, match="`tool_choice.name`"):
        client.messages.create(model="m", max_tokens=4, messages=MESSAGES, tools=[WEATHER], tool_choice={"type": "tool"})
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=4, messages=MESSAGES)
    body = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                      json={"model": "m", "max_tokens": 0, "messages": MESSAGES}).json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error" and "max_tokens" in body["error"]["message"]
