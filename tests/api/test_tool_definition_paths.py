"""A tool definition (or named tool_choice) that breaks a rule is refused naming the field as the
client sent it, in each API's own shape of a tool: chat's `tools[0].function.parameters`, Anthropic's
`tools.0.input_schema` (its list indices as its own errors write them), the Responses API's flat
`tools[0].parameters`. The rules are checked once, on the chat body the other APIs translate into
(parley.tools.validation); the name is translated back."""

from __future__ import annotations

import httpx
import pytest

OPEN = {"type": "object", "properties": {"a": {"type": "object", "additionalProperties": True}}}
NOT_AN_OBJECT = {"type": "string"}
PROPS = {"type": "object", "properties": {"city": {"type": "string"}}}


def chat_tool(name, parameters=PROPS, **extra) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters, **extra}}


def anthropic_tool(name, parameters=PROPS, **extra) -> dict:
    return {"name": name, "input_schema": parameters, **extra}


def responses_tool(name, parameters=PROPS, **extra) -> dict:
    return {"type": "function", "name": name, "parameters": parameters, **extra}


# (name, the request's tools/tool_choice per route, the field as each route's client sent it)
CASES = [
    ("bad name", lambda tool: {"tools": [tool("get weather!")]},
     ("tools[0].function.name", "tools.0.name", "tools[0].name")),
    ("schema not an object", lambda tool: {"tools": [tool("f"), tool("g", NOT_AN_OBJECT)]},
     ("tools[1].function.parameters.type", "tools.1.input_schema.type", "tools[1].parameters.type")),
    ("strict schema left open", lambda tool: {"tools": [tool("f", OPEN, strict=True)]},
     ("tools[0].function.parameters.properties.a.additionalProperties",
      "tools.0.input_schema.properties.a.additionalProperties",
      "tools[0].parameters.properties.a.additionalProperties")),
    ("duplicate name", lambda tool: {"tools": [tool("f"), tool("f")]},
     ("tools[1].function.name", "tools.1.name", "tools[1].name")),
]


def chat(server, fields: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "fake-model", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}], **fields})


def messages(server, fields: dict, path: str = "/v1/messages") -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **fields}
    if path == "/v1/messages":
        body["max_tokens"] = 3
    return httpx.post(server.url + path, json=body, timeout=60)


def responses(server, fields: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", timeout=60,
                      json={"model": "fake-model", "max_output_tokens": 3, "input": "Hi", **fields})


def openai_error(r: httpx.Response, field: str) -> None:
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == field, r.text
    assert error["message"].startswith(f"Input validation error: {field}: "), r.text


def anthropic_error(r: httpx.Response, field: str) -> None:
    """Anthropic's error body has no field of its own for the path: the message names it."""
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error", r.text
    assert field in error["message"] and "function." not in error["message"], r.text


# each route: how it posts, writes a tool, and answers an error
ROUTES = {"chat": (chat, chat_tool, openai_error), "messages": (messages, anthropic_tool, anthropic_error),
          "count_tokens": (lambda server, fields: messages(server, fields, "/v1/messages/count_tokens"),
                           anthropic_tool, anthropic_error),
          "responses": (responses, responses_tool, openai_error)}
FIELD_OF = {"chat": 0, "messages": 1, "count_tokens": 1, "responses": 2}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("request_fields, fields", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_each_route_names_the_tool_field_as_sent(fake_server, route, request_fields, fields):
    post, tool, error = ROUTES[route]
    r = post(fake_server, request_fields(tool))
    error(r, fields[FIELD_OF[route]])
    if route != "chat":
        assert "function." not in r.json()["error"]["message"], r.text


def test_a_named_tool_choice_that_names_no_tool(fake_server):
    openai_error(chat(fake_server, {"tools": [chat_tool("f")],
                                    "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                 "tool_choice.function.name")
    anthropic_error(messages(fake_server, {"tools": [anthropic_tool("f")],
                                           "tool_choice": {"type": "tool", "name": "nope"}}), "tool_choice.name")
    openai_error(responses(fake_server, {"tools": [responses_tool("f")],
                                         "tool_choice": {"type": "function", "name": "nope"}}), "tool_choice.name")


def test_anthropic_any_without_tools_names_its_own_choice(fake_server):
    r = messages(fake_server, {"tool_choice": {"type": "any"}})
    anthropic_error(r, "`tool_choice.type`")
    assert "required" not in r.json()["error"]["message"], r.text  # chat's word for it


def test_what_the_schemas_refuse_is_named_as_sent_too(fake_server):
    """A missing name or a schema that is no object never reaches the tool rules: the route's own
    schema refuses it (errors.describe_validation), naming the field in the route's own words."""
    anthropic_error(messages(fake_server, {"tools": [{"input_schema": PROPS}]}), "`tools.0.name`")
    anthropic_error(messages(fake_server, {"tools": [anthropic_tool("f", [])]}), "`tools.0.input_schema`")
    error = responses(fake_server, {"tools": [{"type": "function", "parameters": PROPS}]}).json()["error"]
    assert error["param"] == "tools.0.name", error
    error = responses(fake_server, {"tools": [responses_tool("f", [])]}).json()["error"]
    assert error["param"] == "tools.0.parameters", error


def test_a_schema_keyword_the_grammar_cannot_take_is_named_tools(server):
    """Refused when the engine compiles the tools' grammar (the real engine's: the fake compiles
    none), which names no one tool: `tools`, a field every route's client sent by that name."""
    unique = {"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}
    for route in ("chat", "messages", "responses"):
        post, tool, _ = ROUTES[route]
        r = post(server, {"model": "m", "tools": [tool("f", unique)]})
        error = r.json()["error"]
        assert r.status_code == (400 if route == "messages" else 422) and error.get("param", "tools") == "tools", r.text
        assert "`tools`: " in error["message"] and "uniqueItems" in error["message"], r.text
        assert "function.parameters" not in error["message"], r.text


def test_structured_output_with_tools_names_the_format_as_sent(fake_server):
    """Chat's `response_format` with tools is a 422: the translated APIs' formats, in their words."""
    structured = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    anthropic_error(messages(fake_server, {"tools": [anthropic_tool("f")], "output_config": structured}),
                    '`output_config.format` and `tools` cannot be combined: drop one, or set `tool_choice` to {"type": "none"}')
    r = messages(fake_server, {"tools": [anthropic_tool("f")], "output_config": structured, "tool_choice": {"type": "none"}})
    assert r.status_code == 200, r.text
    r = responses(fake_server, {"tools": [responses_tool("f")], "text": {"format": {"type": "json_object"}}})
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "text.format" and "`text.format` and `tools`" in error["message"]
