"""Fields inside a Responses API request's objects (`input` items and their content parts,
`tools`, `tool_choice`, `text`): each has its effect, or is refused naming it as sent
(`input.0.content.1.NAME`), unless the server runs with `--unknown-fields ignore`. What the openai
SDK sends back of an earlier answer, Parley's or OpenAI's, is taken, or refused by name where
Parley cannot honour it."""

from __future__ import annotations

import httpx
import openai
import pytest

HI = {"role": "user", "content": "Hi"}
AGAIN = {"role": "user", "content": "Again"}
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
ANSWER = {"type": "message", "role": "assistant",
          "content": [{"type": "output_text", "text": "Hello", "annotations": []}]}


def post(server, input_: list | str | None = None, **body) -> httpx.Response:  # or `input` in body
    return httpx.post(server.url + "/v1/responses", json={"model": "fake-model", "max_output_tokens": 3,
                                                          "input": input_, **body}, timeout=60)


def prompt_tokens(server, input_: list, **body) -> int:
    r = post(server, input_, **body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["input_tokens"]


def with_field(value: dict, **extra) -> dict:
    return {**value, **extra}


# (request fields, where the unknown field `colour` is, as the client sent it)
UNKNOWN = [
    ({"input": [with_field(HI, colour="blue")]}, "input.0.colour"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi", "colour": "blue"}]}]},
     "input.0.content.0.colour"),
    ({"input": [HI, {**ANSWER, "content": [{**ANSWER["content"][0], "colour": "blue"}]}, AGAIN]},
     "input.1.content.0.colour"),
    ({"input": [HI, {**ANSWER, "phase": "final_answer"}, AGAIN]}, "input.1.phase"),  # gpt-5's channels
    ({"input": [HI, with_field(CALL, colour="blue"), OUTPUT]}, "input.1.colour"),
    ({"input": [HI, with_field(CALL, namespace="weather"), OUTPUT]}, "input.1.namespace"),
    ({"input": [HI, CALL, with_field(OUTPUT, colour="blue")]}, "input.2.colour"),
    ({"input": [HI, CALL, with_field(OUTPUT, output=[{"type": "input_text", "text": "sunny", "colour": "blue"}])]},
     "input.2.output.0.colour"),
    ({"input": [HI, {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm.",
                                                                       "colour": "blue"}]}, ANSWER, AGAIN]},
     "input.1.content.0.colour"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi",
                                              "prompt_cache_breakpoint": {"mode": "explicit", "colour": "blue"}}]}]},
     "input.0.content.0.prompt_cache_breakpoint.colour"),
    ({"input": [HI], "tools": [with_field(TOOL, defer_loading=True)]}, "tools.0.defer_loading"),
    ({"input": [HI], "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather", "colour": "blue"}},
     "tool_choice.colour"),
    ({"input": [HI], "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": [HI], "text": {"format": {"type": "json_object", "colour": "blue"}}}, "text.format.colour"),
]


@pytest.mark.parametrize("body, field", UNKNOWN, ids=[field for _, field in UNKNOWN])
def test_an_unknown_nested_field_is_refused_naming_it_as_sent(fake_server, body, field):
    r = post(fake_server, **body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field and error["type"] == "invalid_request_error", r.text
    assert "--unknown-fields ignore" in error["message"]


@pytest.mark.parametrize("body, field", UNKNOWN, ids=[field for _, field in UNKNOWN])
def test_a_server_that_ignores_unknown_fields_takes_them(lenient_fake_server, body, field):
    r = post(lenient_fake_server, **body)
    assert r.status_code == 200 and r.json()["output"], r.text


def test_an_ignored_field_is_not_repeated_in_the_answer(lenient_fake_server):
    response = post(lenient_fake_server, [HI], tools=[with_field(TOOL, defer_loading=True)],
                    text={"format": {"type": "json_object", "colour": "blue"}}, tool_choice="none").json()
    assert response["tools"] == [TOOL] and response["text"] == {"format": {"type": "json_object"}}


def test_what_the_sdk_sends_back_of_an_earlier_answer_is_taken_at_its_word(fake_server):
    with openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused", max_retries=0) as client:
        first = client.responses.create(model="fake-model", max_output_tokens=5, input=[HI])
        second = client.responses.create(model="fake-model", max_output_tokens=5, input=[HI, *first.output, AGAIN])
        plain = [HI, {"role": "assistant", "content": first.output_text}, AGAIN]
        assert second.usage.input_tokens == prompt_tokens(fake_server, plain)
    # OpenAI's answer, as its API writes it: ids, statuses, empty annotations and logprobs, a
    # direct caller; and a cache breakpoint on the question
    question = {"role": "user", "content": [{"type": "input_text", "text": "Hi",
                                             "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}}]}
    answer = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "phase": None,
              "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]}
    call = {**CALL, "id": "fc_1", "status": "completed", "caller": {"type": "direct"}}
    echoed = [question, answer, call, {**OUTPUT, "id": "fco_1", "status": "completed", "caller": {"type": "direct"}}]
    bare = [HI, {"role": "assistant", "content": "Let me look."}, CALL, OUTPUT]
    assert prompt_tokens(fake_server, echoed, tools=[TOOL]) == prompt_tokens(fake_server, bare, tools=[TOOL])


def test_a_reasoning_items_summary_beside_its_content_is_taken(fake_server):
    reasoning = {"type": "reasoning", "id": "rs_1", "status": "completed",
                 "content": [{"type": "reasoning_text", "text": "Hm."}]}
    summarized = {**reasoning, "summary": [{"type": "summary_text", "text": "Thought briefly."}]}
    assert prompt_tokens(fake_server, [HI, summarized, ANSWER, AGAIN]) == \
        prompt_tokens(fake_server, [HI, reasoning, ANSWER, AGAIN])


def test_an_earlier_refusal_and_a_listed_call_output_reach_the_template_as_text(fake_server):
    refused = {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot say."}]}
    said = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "I cannot say."}]}
    assert prompt_tokens(fake_server, [HI, refused, AGAIN]) == prompt_tokens(fake_server, [HI, said, AGAIN])
    listed = with_field(OUTPUT, output=[{"type": "input_text", "text": "sun"}, {"type": "input_text", "text": "ny"}])
    assert prompt_tokens(fake_server, [HI, CALL, listed], tools=[TOOL]) == \
        prompt_tokens(fake_server, [HI, CALL, OUTPUT], tools=[TOOL])


@pytest.mark.parametrize("item, field", [
    ({**ANSWER, "content": [{"type": "output_text", "text": "Hello", "annotations": [{"type": "url_citation"}]}]},
     "input.1.content.0.annotations"),  # the template sees text only: the citations would be lost
    ({"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAB"},
     "input.1.encrypted_content"),  # OpenAI's, which Parley cannot read
    ({"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Thought."}]},
     "input.1.summary"),  # the reasoning itself is not there
    ({**CALL, "caller": {"type": "program", "caller_id": "prog_1"}}, "input.1.caller.type"),
])
def test_what_an_earlier_answer_holds_that_cannot_be_honoured_is_refused(fake_server, item, field):
    r = post(fake_server, [HI, item, AGAIN], tools=[TOOL])
    assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


def test_pydantics_own_complaints_name_the_field_as_sent(fake_server):
    """Not `input.0.message.content.0.input_text.text` (the tags) nor "`input`: Input should be a
    valid string" (the other member of `str | list[item]`)."""
    r = post(fake_server, [{"role": "user", "content": [{"type": "input_text"}]}])
    assert r.status_code == 422 and r.json()["error"]["message"] == \
        "Input validation error: `input.0.content.0.text`: Field required", r.text
    r = post(fake_server, [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}])
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "input.0.content.0" and "valid string" not in error["message"]
