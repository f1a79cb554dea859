"""Fields inside an Anthropic request's objects (messages, content blocks, tools, tool_choice,
thinking, output_config, cache_control): each has its effect, or is refused naming it as sent
(`messages.0.content.1.NAME`), unless the server runs with `--unknown-fields ignore`. What the
anthropic SDK sends back of an earlier answer, Parley's or Claude's, is taken."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from anthropic.types import Message

HI = [{"role": "user", "content": "Hi"}]
TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}


def post(server, path: str = "/v1/messages", **body) -> httpx.Response:
    body = {"model": "fake-model", "messages": HI, **body}
    if path == "/v1/messages":
        body.setdefault("max_tokens", 3)
    return httpx.post(server.url + path, json=body, timeout=60)


def with_field(value: dict, **extra) -> dict:
    return {**value, **extra}


# (request fields, where the unknown field `colour` is, as the client sent it)
UNKNOWN = [
    ({"messages": [with_field(HI[0], colour="blue")]}, "messages.0.colour"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                 {"type": "text", "text": "!", "colour": "blue"}]}]},
     "messages.0.content.1.colour"),
    ({"messages": [*HI, {"role": "assistant", "content": [with_field(CALL, colour="blue")]},
                   {"role": "user", "content": [RESULT]}], "tools": [TOOL]}, "messages.1.content.0.colour"),
    ({"messages": [*HI, {"role": "assistant", "content": [CALL]},
                   {"role": "user", "content": [with_field(RESULT, colour="blue")]}], "tools": [TOOL]},
     "messages.2.content.0.colour"),
    ({"messages": [*HI, {"role": "assistant", "content": [CALL]}, {"role": "user", "content": [
        with_field(RESULT, content=[{"type": "text", "text": "sunny", "colour": "blue"}])]}], "tools": [TOOL]},
     "messages.2.content.0.content.0.colour"),
    ({"messages": [*HI, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Hm.", "signature": "", "colour": "blue"}, {"type": "text", "text": "Hello"}]},
        *HI]}, "messages.1.content.0.colour"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral", "colour": "blue"}}]}]},
     "messages.0.content.0.cache_control.colour"),
    ({"system": [{"type": "text", "text": "Be brief.", "colour": "blue"}]}, "system.0.colour"),
    ({"tools": [with_field(TOOL, colour="blue")]}, "tools.0.colour"),
    ({"tools": [TOOL], "tool_choice": {"type": "auto", "colour": "blue"}}, "tool_choice.colour"),
    ({"tools": [TOOL], "tool_choice": {"type": "auto", "cache_control": {"type": "ephemeral"}}},
     "tool_choice.cache_control"),  # Anthropic takes no breakpoint there
    ({"thinking": {"type": "disabled", "colour": "blue"}}, "thinking.colour"),
    ({"output_config": {"effort": "low"}}, "output_config.effort"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}, "colour": "blue"}}},
     "output_config.format.colour"),
]


@pytest.mark.parametrize("body, field", UNKNOWN, ids=[field for _, field in UNKNOWN])
def test_an_unknown_nested_field_is_refused_naming_it_as_sent(fake_server, body, field):
    r = post(fake_server, **body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error", r.text
    assert f"`{field}`" in error["message"] and "--unknown-fields ignore" in error["message"], r.text


@pytest.mark.parametrize("body, field", UNKNOWN, ids=[field for _, field in UNKNOWN])
def test_a_server_that_ignores_unknown_fields_takes_them(lenient_fake_server, body, field):
    r = post(lenient_fake_server, **body)
    assert r.status_code == 200 and r.json()["content"], r.text


def test_count_tokens_refuses_them_too_and_takes_a_cache_breakpoint(fake_server):
    r = post(fake_server, "/v1/messages/count_tokens", messages=[with_field(HI[0], colour="blue")])
    assert r.status_code == 400 and "`messages.0.colour`" in r.text
    counted = post(fake_server, "/v1/messages/count_tokens", cache_control={"type": "ephemeral", "ttl": "1h"})
    assert counted.status_code == 200 and counted.json() == post(fake_server, "/v1/messages/count_tokens").json()


def counted(client: anthropic.Anthropic, messages: list, **kwargs) -> int:
    return client.messages.count_tokens(model="fake-model", messages=messages, **kwargs).input_tokens


def test_what_the_sdk_sends_back_of_an_earlier_answer_is_taken_at_its_word(fake_server):
    with anthropic.Anthropic(base_url=fake_server.url, api_key="unused", max_retries=0) as client:
        # Parley's answer, sent back as the SDK makes it (Message.to_param)
        first = client.messages.create(model="fake-model", max_tokens=5, messages=HI)
        history = [*HI, first.to_param(), {"role": "user", "content": "Again"}]
        second = client.messages.create(model="fake-model", max_tokens=5, messages=history)
        plain = [*HI, {"role": "assistant", "content": first.content[0].text}, {"role": "user", "content": "Again"}]
        assert second.usage.input_tokens == counted(client, plain)
        # Claude's answer, as Anthropic's API writes it: a signed thinking block, a text block whose
        # citations are null, a tool call the model made itself; cache breakpoints on the blocks
        claude = Message.model_validate({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "stop_reason": "tool_use",
            "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1},
            "content": [{"type": "thinking", "thinking": "Weather, then.", "signature": "EqQBCgIYAhIM1gbcDa9GJw"},
                        {"type": "text", "text": "Let me look.", "citations": None},
                        {**CALL, "caller": {"type": "direct"}}]})
        breakpoint_ = {"cache_control": {"type": "ephemeral", "ttl": "5m"}}
        echoed = [{"role": "user", "content": [{"type": "text", "text": "Hi", **breakpoint_}]}, claude.to_param(),
                  {"role": "user", "content": [{**RESULT, **breakpoint_}]}]
        thought = {"type": "thinking", "thinking": "Weather, then.", "signature": ""}
        bare = [*HI, {"role": "assistant", "content": [thought, {"type": "text", "text": "Let me look."}, CALL]},
                {"role": "user", "content": [RESULT]}]
        tools = [{**TOOL, "cache_control": {"type": "ephemeral"}}]
        assert counted(client, echoed, tools=tools) == counted(client, bare, tools=[TOOL])
        answer = client.messages.create(model="fake-model", max_tokens=5, messages=echoed, tools=tools)
        assert answer.usage.input_tokens == counted(client, bare, tools=[TOOL])


@pytest.mark.parametrize("block, field", [
    ({"type": "text", "text": "Hello", "citations": [{"type": "char_location", "cited_text": "x"}]},
     "messages.1.content.0.citations"),  # the template sees text only: the citations would be lost
    ({**CALL, "caller": {"type": "code_execution_20250825", "tool_id": "srvtoolu_1"}},
     "messages.1.content.0.caller.type"),  # one of Anthropic's server tools made that call
])
def test_what_an_earlier_answer_holds_that_cannot_be_honoured_is_refused(fake_server, block, field):
    r = post(fake_server, "/v1/messages/count_tokens", tools=[TOOL],
             messages=[*HI, {"role": "assistant", "content": [block]}, *HI])
    assert r.status_code == 400 and f"`{field}`" in r.json()["error"]["message"], r.text


def test_thinking_display_summarized_is_what_parley_does_and_omitted_is_refused(fake_server):
    assert post(fake_server, thinking={"type": "disabled", "display": "summarized"}).status_code == 200
    r = post(fake_server, thinking={"type": "disabled", "display": "omitted"})
    assert r.status_code == 400 and "`thinking.display`" in r.text, r.text


def test_a_strict_tool_closes_its_input_schema(fake_server):
    open_schema = {"type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": True}
    assert post(fake_server, tools=[{**TOOL, "input_schema": open_schema, "strict": False}]).status_code == 200
    r = post(fake_server, tools=[{**TOOL, "input_schema": open_schema, "strict": True, "type": "custom"}])
    assert r.status_code == 400 and "additionalProperties" in r.json()["error"]["message"], r.text


def test_pydantics_own_complaints_name_the_field_as_sent(fake_server):
    """Not `messages.0.content.0.text.text` (the block's tag) nor "`messages.0.content`: Input should
    be a valid string" (the other member of `str | list[block]`)."""
    r = post(fake_server, messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert r.status_code == 400 and r.json()["error"]["message"] == \
        "Input validation error: `messages.0.content.0.text`: Field required", r.text
    r = post(fake_server, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}])
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.startswith("Input validation error: `messages.0.content.0`: Input tag "
                                                       "'image'") and "valid string" not in message, r.text
