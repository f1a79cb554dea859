"""openai's `client.responses` (the Responses API) against /v1/responses: the same answers as chat
completions of the same conversation, the stream's typed events, previous_response_id, tools,
text.format, the stored answers."""

from __future__ import annotations

import openai
import pytest

from sdk_common import CITY_SCHEMA, KEY, MESSAGES, WEATHER_FUNCTION, assert_city_json, assert_weather_call

pytestmark = pytest.mark.slow
WEATHER = {"type": "function", **WEATHER_FUNCTION}
QUESTION = MESSAGES[0]["content"]


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def chat(client, messages, max_tokens):
    return client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0)


def test_a_response_is_the_chat_completion_of_its_conversation(client):
    r = client.responses.create(model="m", input=QUESTION, instructions="Answer in French.", max_output_tokens=6,
                                temperature=0)
    expected = chat(client, [{"role": "system", "content": "Answer in French."}, *MESSAGES], 6)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "m"
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert r.output_text == expected.choices[0].message.content and [o.type for o in r.output] == ["message"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (expected.usage.prompt_tokens, 6)
    # the next turn sees the first one's input and output, not its instructions
    again = client.responses.create(model="m", input="Shorter, please.", previous_response_id=r.id,
                                    max_output_tokens=4, temperature=0)
    history = [*MESSAGES, {"role": "assistant", "content": r.output_text}, {"role": "user", "content": "Shorter, please."}]
    expected = chat(client, history, 4)
    assert again.output_text == expected.choices[0].message.content
    assert again.usage.input_tokens == expected.usage.prompt_tokens and again.previous_response_id == r.id


def test_the_stream_is_the_typed_events_in_order(client):
    kwargs = dict(model="m", input=QUESTION, max_output_tokens=5, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text == events[-4].text


def test_a_forced_function_call_and_its_output(client):
    kwargs = dict(model="m", input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                  parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    r = client.responses.create(**kwargs)
    (call,) = r.output
    assert r.status == "completed" and call.type == "function_call" and call.call_id
    assert_weather_call(call.name, call.arguments)
    with client.responses.stream(**kwargs) as stream:
        types = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in types and types[-1] == "response.completed"
    assert [(o.type, o.name, o.arguments) for o in streamed.output] == [(call.type, call.name, call.arguments)]
    answer = client.responses.create(model="m", previous_response_id=r.id, tools=[WEATHER], max_output_tokens=8,
                                     temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                            "output": "Sunny, 24 C"}])
    assert answer.output_text and answer.usage.input_tokens > r.usage.input_tokens


def test_text_format_is_structured_output(client):
    r = client.responses.create(model="m", input="Give the capital of France as JSON.", max_output_tokens=40,
                                temperature=0, text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA}})
    assert_city_json(r.output_text)


def test_stored_responses_and_their_errors(client):
    r = client.responses.create(model="m", input="Hi", max_output_tokens=2)
    assert client.responses.retrieve(r.id).output_text == r.output_text
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(r.id)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError, match="Previous response with id '" + r.id):
        client.responses.create(model="m", input="Hi", previous_response_id=r.id)
    unstored = client.responses.create(model="m", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="`reasoning`"):  # not a reasoning model: refused, not ignored
        client.responses.create(model="m", input="Hi", reasoning={"effort": "low"})
    with pytest.raises(openai.NotFoundError, match="`gpt-5` does not exist"):
        client.responses.create(model="gpt-5", input="Hi")
    with pytest.raises(openai.UnprocessableEntityError, match="`input`"):  # nothing to answer
        client.responses.create(model="m", input=[])
    with pytest.raises(openai.UnprocessableEntityError, match="`input.1`: function_call_output 'call_x' answers no"):
        client.responses.create(model="m", input=[{"role": "user", "content": "Hi"},
                                                  {"type": "function_call_output", "call_id": "call_x", "output": "1"}])
