"""text-generation (TGI's own client, 0.7): `Client(URL)`. It posts generate/generate_stream to the
base URL itself (POST /) and chat to /v1/chat/completions; it has no stop nor response_format on
chat, so those go through generate; it has no model-info call."""

from __future__ import annotations

import json

import pytest
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType, Message, Tool

from sdk_common import CITY_SCHEMA, KEY, MESSAGES, SAMPLED, WEATHER_FUNCTION, assert_city_json, assert_weather_call
from server import CLIENT_TIMEOUT_S

# the client calls pydantic v1's .dict() on every request
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")]

QUESTION = [Message(**MESSAGES[0])]
PROMPT = "The capital of France is"


@pytest.fixture
def client(server):
    return Client(server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=CLIENT_TIMEOUT_S)


def test_chat(client):
    r = client.chat(QUESTION, max_tokens=4, temperature=0.01, seed=1)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage["completion_tokens"] == 4


def test_chat_stream(client):
    """The client json-decodes the closing `data: [DONE]` (its bug; TGI sends [DONE] too), after
    every chunk has been parsed and handed over."""
    chunks = []
    with pytest.raises(json.JSONDecodeError):
        for chunk in client.chat(QUESTION, max_tokens=4, stream=True, seed=1, temperature=0.01):
            chunks.append(chunk)
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_generate_stream(client):
    tokens = list(client.generate_stream(PROMPT, max_new_tokens=4))
    whole = client.generate(PROMPT, max_new_tokens=4)
    assert "".join(t.token.text for t in tokens) == whole.generated_text
    assert tokens[-1].details.finish_reason == whole.details.finish_reason == "length"


def test_n_and_seed(client):
    kwargs = dict(n=2, seed=7, temperature=SAMPLED["temperature"], max_tokens=SAMPLED["max_tokens"])
    first, again = client.chat(QUESTION, **kwargs), client.chat(QUESTION, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_stop(client):
    full = client.generate(PROMPT, max_new_tokens=8).generated_text
    r = client.generate(PROMPT, max_new_tokens=8, stop_sequences=[full[3:5]])
    assert r.details.finish_reason == "stop_sequence" and r.generated_text.startswith(full[:3])


def test_json_grammar(client):
    r = client.generate("Give the capital of France as JSON: ", max_new_tokens=30,
                        grammar=Grammar(type=GrammarType.Json, value=CITY_SCHEMA))
    assert_city_json(r.generated_text)


def test_required_tool_call(client):
    """tool_choice is a plain string here: a function name (TGI's rule)."""
    r = client.chat([Message(role="user", content="What is the weather in Paris?")], max_tokens=60, seed=1,
                    temperature=0.01, tools=[Tool(type="function", function=WEATHER_FUNCTION)],
                    tool_choice="get_weather")
    call = r.choices[0].message.tool_calls[0]
    assert_weather_call(call["function"]["name"], call["function"]["arguments"])


def test_bad_request(client):
    with pytest.raises(ValidationError, match="stop"):  # the server's 422, not the client's own checks
        client.generate(PROMPT, max_new_tokens=2, stop_sequences=["a", "b", "c", "d", "e"])
