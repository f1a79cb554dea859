"""openai: `OpenAI(base_url=URL + "/v1")`; also SiliconFlow's dialect, which its users reach with
the same SDK at `URL + "/siliconflow/v1"`."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from sdk_common import (CITY_SCHEMA, HI, JSON_MESSAGES, KEY, MESSAGES, SAMPLED, WEATHER_MESSAGES, WEATHER_TOOL,
                        assert_city_json, assert_weather_call)

pytestmark = pytest.mark.slow


@pytest.fixture
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def siliconflow(server):
    return OpenAI(base_url=server.url + "/siliconflow/v1", api_key=KEY, max_retries=0)


def test_chat(client):
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_an_end_user_is_taken_everywhere_the_sdk_sends_one(client):
    """`user` and `safety_identifier` (the scheduler's turns among users: tests/engine) change no answer."""
    plain = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0)
    named = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0, user="u1",
                                           safety_identifier="u2")
    assert named.choices[0].message.content == plain.choices[0].message.content
    assert client.completions.create(model="m", prompt="Hello", max_tokens=2, user="u1").choices[0].text
    assert client.responses.create(model="m", input="Hello", max_output_tokens=4, user="u1",
                                   safety_identifier="u2").output_text


def test_chat_stream(client):
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4


def test_n_and_seed(client):
    kwargs = dict(model="m", messages=MESSAGES, n=2, seed=7, **SAMPLED)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_stop(client):
    text = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0) \
        .choices[0].message.content
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0, stop=[text[3:5]])
    assert r.choices[0].message.content == text[: text.index(text[3:5])] and r.choices[0].finish_reason == "stop"


def test_json_response_format(client):
    r = client.chat.completions.create(
        model="m", messages=JSON_MESSAGES, max_tokens=30, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
    assert_city_json(r.choices[0].message.content)


def test_required_tool_call(client):
    r = client.chat.completions.create(model="m", messages=WEATHER_MESSAGES, max_tokens=60, temperature=0,
                                       tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    assert_weather_call(call.function.name, call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls" and call.id


def test_every_listed_model_is_served_and_no_other(client):
    names = [model.id for model in client.models.list().data]
    assert names == ["m", "Qwen/Qwen2.5-7B-Instruct"]  # --served-model-name, twice (tests/server.py)
    for name in names:
        assert client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=1).model == "m"
    with pytest.raises(openai.NotFoundError, match="gpt-9000"):
        client.completions.create(model="gpt-9000", prompt="Hi", max_tokens=1)


def test_bad_request(client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, temperature=5)
    assert "temperature" in err.value.message


def test_prediction(client):
    """OpenAI's predicted outputs share Mistral's shape; a prediction leaves the greedy output as it
    is (a short answer here: test_mistralai.py has the long one), and usage says how many of its
    tokens were kept, and verified and not kept."""
    plain = client.chat.completions.create(model="m", messages=HI, max_tokens=20, temperature=0)
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # no prediction, no thinking
    kept, half_wrong = {}, text[: len(text) // 2] + " banana" + text[len(text) // 2 :]
    for guess in (text, half_wrong, "something else entirely"):
        r = client.chat.completions.create(model="m", messages=HI, max_tokens=20, temperature=0,
                                           prediction={"type": "content", "content": guess})
        assert r.choices[0].message.content == text
        details = r.usage.completion_tokens_details
        kept[guess] = (details.accepted_prediction_tokens, details.rejected_prediction_tokens)
    assert kept[text][0] >= r.usage.completion_tokens // 2 and kept[text][1] <= 8
    assert kept[half_wrong][0] > 0 and kept[half_wrong][1] > 0  # " banana" drafted, not kept
    assert kept["something else entirely"][0] == 0  # never drafted: nothing of it matched the output


# -- SiliconFlow ----------------------------------------------------------------------------------
def test_siliconflow_says_eos_where_others_say_stop(client, siliconflow):
    kwargs = dict(model="Qwen/Qwen2.5-7B-Instruct", messages=HI, max_tokens=40, temperature=0)
    assert client.chat.completions.create(**kwargs).choices[0].finish_reason == "stop"
    assert siliconflow.chat.completions.create(**kwargs).choices[0].finish_reason == "eos"
    chunks = list(siliconflow.chat.completions.create(**kwargs, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["eos"]


def test_siliconflow_stop_sequence_and_length_keep_their_names(siliconflow):
    r = siliconflow.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    text = r.choices[0].message.content
    r = siliconflow.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, temperature=0,
                                            stop=[text[2:4]])
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("limits, field", [({"max_tokens": 4096}, "max_tokens"), ({"max_tokens": 1}, "max_tokens"),
                                           ({"stop": ["a", "b", "c", "d", "e"]}, "stop")])
def test_siliconflow_limits(siliconflow, limits, field):
    kwargs = {"max_tokens": 2, **limits}
    with pytest.raises(openai.UnprocessableEntityError) as err:
        siliconflow.chat.completions.create(model="m", messages=MESSAGES, **kwargs)
    assert err.value.body["param"] == field and f"`{field}`" in err.value.message
