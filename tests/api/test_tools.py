"""Tool calling on the real server (default SmolLM2 model, whose template knows no tools): calls are
well-formed by construction and come back in OpenAI's shape, whole and streamed (SDK-WIRE §1.5)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from huggingface_hub import InferenceClient
from openai import AsyncOpenAI, OpenAI
from text_generation import Client
from text_generation.types import Message, Tool

from server import CLIENT_TIMEOUT_S, sse_events

pytestmark = pytest.mark.slow

MAX_TOKENS = 150
PARAMETERS = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False,
    },
    "get_time": {
        "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}, "required": ["timezone"],
        "additionalProperties": False,
    },
}
DESCRIPTIONS = {"get_weather": "The current weather in a city", "get_time": "The current time in a timezone"}
TOOLS = [{"type": "function", "function": {"name": name, "description": DESCRIPTIONS[name], "parameters": schema}}
         for name, schema in PARAMETERS.items()]
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}
SAMPLING = {"greedy": {"temperature": 0}, "sampled": {"temperature": 1.0, "seed": 5}}


@pytest.fixture
def oai(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)


def chat(oai, **kwargs):
    return oai.chat.completions.create(**{"model": "m", "messages": MESSAGES, "tools": TOOLS,
                                          "max_tokens": MAX_TOKENS, **kwargs})


def check_call(call_id, name: str, arguments: str, names=tuple(PARAMETERS)) -> None:
    assert isinstance(call_id, str) and call_id.startswith("call_")
    assert name in names
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def check_calls(choice, names=tuple(PARAMETERS)) -> None:
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function"
        check_call(call.id, call.function.name, call.function.arguments, names)


def streamed_calls(stream) -> tuple[list[dict], list]:
    """The calls a stream of chunks builds (first entry of a call: id, type, name), and the chunks."""
    chunks, calls = list(stream), {}
    for chunk in chunks:
        for entry in chunk.choices[0].delta.tool_calls or []:
            if entry.index not in calls:
                assert entry.id and entry.type == "function" and entry.function.name
                calls[entry.index] = {"id": entry.id, "name": entry.function.name, "arguments": ""}
            calls[entry.index]["arguments"] += entry.function.arguments or ""
    return [calls[i] for i in sorted(calls)], chunks


@pytest.mark.parametrize("sampling", SAMPLING.values(), ids=SAMPLING)
@pytest.mark.parametrize("tool_choice, names", [("required", tuple(PARAMETERS)), (NAMED, ("get_time",))],
                         ids=["required", "named"])
def test_forced_calls_validate(oai, tool_choice, names, sampling):
    choice = chat(oai, tool_choice=tool_choice, **sampling).choices[0]
    check_calls(choice, names)
    assert choice.message.content is None
    if tool_choice is NAMED:
        assert len(choice.message.tool_calls) == 1


@pytest.mark.parametrize("sampling", SAMPLING.values(), ids=SAMPLING)
@pytest.mark.parametrize("tool_choice, names", [("required", tuple(PARAMETERS)), (NAMED, ("get_time",))],
                         ids=["required", "named"])
def test_streamed_forced_calls_validate(oai, tool_choice, names, sampling):
    calls, chunks = streamed_calls(chat(oai, tool_choice=tool_choice, stream=True, **sampling))
    assert calls and chunks[-1].choices[0].finish_reason == "tool_calls"
    for call in calls:
        check_call(call["id"], call["name"], call["arguments"], names)


def test_stream_matches_the_whole_answer(oai):
    whole = chat(oai, tool_choice="required", temperature=0).choices[0].message.tool_calls
    calls, _ = streamed_calls(chat(oai, tool_choice="required", temperature=0, stream=True))
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in whole]


def test_stream_chunk_shape(http):
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": MAX_TOKENS, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert all(d["role"] == "assistant" and "tool_calls" in d for d in deltas)
    tool_deltas = [d for d in deltas if d["tool_calls"]]
    first = tool_deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["function"]["name"] == "get_time"
    assert all(d["content"] is None for d in tool_deltas)
    assert all(d["content"] is not None for d in deltas if not d["tool_calls"])
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_no_parallel_calls_gives_exactly_one(oai, stream):
    kwargs = {"tool_choice": "required", "parallel_tool_calls": False, "temperature": 1.0, "seed": 3}
    if stream:
        calls, _ = streamed_calls(chat(oai, stream=True, **kwargs))
        assert len(calls) == 1
    else:
        choice = chat(oai, **kwargs).choices[0]
        check_calls(choice)
        assert len(choice.message.tool_calls) == 1


def test_n_choices_are_each_constrained(oai):
    # One call each, so that no sampled choice can spend max_tokens on call after call ("length").
    r = chat(oai, tool_choice="required", n=3, temperature=1.0, seed=9, parallel_tool_calls=False)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice in r.choices:
        check_calls(choice)


@pytest.mark.parametrize("sampling", SAMPLING.values(), ids=SAMPLING)
@pytest.mark.parametrize("content", ["What is the weather like in Paris right now?", "Tell me a joke."])
def test_auto_gives_text_or_valid_calls(oai, content, sampling):
    choice = chat(oai, messages=[{"role": "user", "content": content}], tool_choice="auto", **sampling).choices[0]
    if choice.message.tool_calls:
        check_calls(choice)
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content
        assert choice.finish_reason in ("stop", "length")


def test_tool_choice_none_gives_plain_text(oai):
    choice = chat(oai, tool_choice="none", temperature=0).choices[0]
    assert choice.message.content and choice.message.tool_calls is None and choice.finish_reason != "tool_calls"


def test_tool_choice_none_leaves_response_format_free_to_apply(oai):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    content = chat(oai, tool_choice="none", temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "c", "schema": schema}}).choices[0].message.content
    jsonschema.validate(json.loads(content), schema)


def follow_up(result: dict) -> list[dict]:
    return MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": json.dumps(result)},
    ]


@pytest.mark.parametrize("tools", [{"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "none"}, {}],
                         ids=["auto", "none", "no_tools"])
def test_follow_up_turn_with_tool_result(oai, tools):
    """A tool's result reaches the prompt and the model answers after it. What a 135M model makes of
    it is its own business (on one CPU it echoed the result, on another it repeated itself), so the
    answer's words are not read: test_tool_messages.py checks how the result is rendered."""
    result = {"temperature": 21, "sky": "sunny"}
    r = oai.chat.completions.create(model="m", messages=follow_up(result), max_tokens=40, temperature=0, **tools)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert "tool_choice" not in tools
        check_calls(choice)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
    longer = oai.chat.completions.create(model="m", messages=follow_up({**result, "wind": "a light breeze from the west"}),
                                         max_tokens=1, temperature=0, **tools)
    assert longer.usage.prompt_tokens > r.usage.prompt_tokens


FORCED_TRIES = 50


def test_forced_calls_end_within_max_tokens(server):
    """50 seeded forced answers (OpenAI's "required", Mistral's "any") with max_tokens 100, sampled
    at temperature 1, all at once: none is cut off ("length"), none repeats a call, and every call
    validates. Before compact calls and the call bounds, 19 of these 50 ended in "length"."""

    async def run():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=CLIENT_TIMEOUT_S) as client:
            async def one(seed):
                return (await client.chat.completions.create(
                    model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required" if seed % 2 else "any",
                    max_tokens=100, temperature=1.0, seed=seed)).choices[0]

            return await asyncio.gather(*(one(seed) for seed in range(FORCED_TRIES)))

    choices = asyncio.run(run())
    assert [c.finish_reason for c in choices].count("length") == 0, [c.message for c in choices]
    for choice in choices:
        check_calls(choice)
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert len(set(calls)) == len(calls), calls


def test_mistral_any_means_required(http):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "any",
                                                "max_tokens": MAX_TOKENS, "temperature": 0})
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and choice["finish_reason"] == "tool_calls"
    for call in choice["message"]["tool_calls"]:
        check_call(call["id"], call["function"]["name"], call["function"]["arguments"])


def test_text_generation_bare_string_names_a_function(server):
    client = Client(server.url, timeout=CLIENT_TIMEOUT_S)
    tools = [Tool(type="function", function=t["function"]) for t in TOOLS]
    r = client.chat(messages=[Message(role="user", content=MESSAGES[0]["content"])], tools=tools,
                    tool_choice="get_time", max_tokens=MAX_TOKENS, temperature=None)
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    check_call(call["id"], call["function"]["name"], call["function"]["arguments"], ("get_time",))


def test_huggingface_hub_with_tool_prompt(server):
    client = InferenceClient(base_url=server.url, api_key="unused")
    r = client.chat_completion(messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS,
                               temperature=0, tool_prompt="Call one of these functions to answer.")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        check_call(call.id, call.function.name, call.function.arguments)


def many_tools(count: int) -> list[dict]:
    return [{"type": "function", "function": {"name": f"f{i}"}} for i in range(count)]


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": many_tools(129)}, "tools", ["128", "129"]),
    ({"tools": [{"type": "function", "function": {"name": "get weather!"}}]}, "tools[0].function.name",
     ["tools[0].function.name", "get weather!"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", ["nope"]),
    ({"tool_choice": "required"}, "tool_choice", ["required"]),
    ({"tools": TOOLS, "min_tokens": 5}, "min_tokens", ["min_tokens", "tools"]),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", ["response_format", "tools"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}]}, "tools", ["uniqueItems"]),
])
def test_invalid_tool_requests_are_422(oai, extra, param, words):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5, extra_body=extra)
    assert e.value.body["param"] == param
    assert all(w in e.value.message for w in words), e.value.message


def test_128_tools_are_fine(oai):
    choice = chat(oai, tools=many_tools(128), tool_choice="required", parallel_tool_calls=False, max_tokens=30,
                  temperature=0).choices[0]
    assert choice.finish_reason == "tool_calls" and json.loads(choice.message.tool_calls[0].function.arguments) == {}
