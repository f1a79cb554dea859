"""azure-ai-inference: `ChatCompletionsClient(endpoint=URL + "/models")` (AI Foundry style) or
`endpoint=URL` (serverless style), with an `AzureKeyCredential`; sync and `azure.ai.inference.aio`."""

from __future__ import annotations

import pytest
from azure.ai.inference import ChatCompletionsClient
from azure.ai.inference.aio import ChatCompletionsClient as AsyncChatCompletionsClient
from azure.ai.inference.models import (ChatCompletionsToolChoicePreset, ChatCompletionsToolDefinition,
                                       FunctionDefinition, JsonSchemaFormat)
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

from sdk_common import (CITY_SCHEMA, JSON_MESSAGES, KEY, MESSAGES, SAMPLED, WEATHER_FUNCTION, WEATHER_MESSAGES,
                        assert_city_json, assert_weather_call)

pytestmark = pytest.mark.slow

ENDPOINT_SHAPES = ["/models", ""]


@pytest.fixture(params=ENDPOINT_SHAPES, ids=["ai-foundry", "serverless"])
def client(server, request):
    with ChatCompletionsClient(endpoint=server.url + request.param, credential=AzureKeyCredential(KEY)) as c:
        yield c


@pytest.fixture
def foundry(server):
    with ChatCompletionsClient(endpoint=server.url + "/models", credential=AzureKeyCredential(KEY)) as c:
        yield c


def test_chat(client):
    r = client.complete(messages=MESSAGES, max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_chat_stream(client):
    updates = list(client.complete(messages=MESSAGES, max_tokens=4, temperature=0, stream=True))
    text = "".join(u.choices[0].delta.content or "" for u in updates if u.choices)
    assert text == client.complete(messages=MESSAGES, max_tokens=4, temperature=0).choices[0].message.content


def test_model_info(client):
    info = client.get_model_info()
    assert info.model_name and info.model_type == "chat_completion" and info.model_provider_name == "Parley"


def test_n_and_seed_as_model_extras(foundry):
    """`n` is no Azure parameter: it travels in model_extras, at the body's root."""
    first, again = (foundry.complete(messages=MESSAGES, seed=7, model_extras={"n": 2}, **SAMPLED)
                    for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_stop(foundry):
    text = foundry.complete(messages=MESSAGES, max_tokens=8, temperature=0).choices[0].message.content
    r = foundry.complete(messages=MESSAGES, max_tokens=8, temperature=0, stop=[text[3:5]])
    assert r.choices[0].message.content == text[: text.index(text[3:5])] and r.choices[0].finish_reason == "stop"


def test_json_response_format(foundry):
    r = foundry.complete(messages=JSON_MESSAGES, max_tokens=30, temperature=0,
                         response_format=JsonSchemaFormat(name="city", schema=CITY_SCHEMA, strict=True))
    assert_city_json(r.choices[0].message.content)


def test_required_tool_call(foundry):
    tool = ChatCompletionsToolDefinition(function=FunctionDefinition(**WEATHER_FUNCTION))
    r = foundry.complete(messages=WEATHER_MESSAGES, max_tokens=60, temperature=0, tools=[tool],
                         tool_choice=ChatCompletionsToolChoicePreset.REQUIRED,
                         model_extras={"parallel_tool_calls": False})
    call = r.choices[0].message.tool_calls[0]
    assert_weather_call(call.function.name, call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"


def test_bad_request(foundry):
    with pytest.raises(HttpResponseError) as err:
        foundry.complete(messages=MESSAGES, max_tokens=2, temperature=5)
    assert err.value.status_code == 422 and "temperature" in err.value.message


def test_wrong_key(server):
    with ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential("wrong")) as c, \
            pytest.raises(ClientAuthenticationError):
        c.complete(messages=MESSAGES, max_tokens=1)


# -- the extra-parameters header ------------------------------------------------------------------
def test_unknown_parameter_with_extra_parameters_error_is_422(foundry):
    body = {"messages": MESSAGES, "max_tokens": 2, "best_guess": 1, "n": 1}
    with pytest.raises(HttpResponseError) as err:
        foundry.complete(body=body, headers={"extra-parameters": "error"})
    assert err.value.status_code == 422 and "`best_guess`" in err.value.message and "`n`" not in err.value.message


@pytest.mark.parametrize("mode", ["drop", "pass-through"])
def test_unknown_parameters_are_ignored_otherwise(foundry, mode):
    r = foundry.complete(body={"messages": MESSAGES, "max_tokens": 2, "best_guess": 1, "n": 2},
                         headers={"extra-parameters": mode})
    assert len(r.choices) == 2  # the known extra parameter (n) is honored


def test_unknown_parameters_without_the_header_are_refused(foundry):
    """No header: as every route, OpenAI's 400 naming the parameter (Azure's own default is `error`)."""
    with pytest.raises(HttpResponseError) as err:
        foundry.complete(body={"messages": MESSAGES, "max_tokens": 2, "best_guess": 1, "n": 2})
    assert err.value.status_code == 400 and "`best_guess`" in err.value.message


# -- azure.ai.inference.aio -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", ENDPOINT_SHAPES)
async def test_async_client(server, shape):
    async with AsyncChatCompletionsClient(endpoint=server.url + shape, credential=AzureKeyCredential(KEY)) as c:
        whole = await c.complete(messages=MESSAGES, max_tokens=4, temperature=0)
        assert whole.choices[0].message.content and whole.usage.completion_tokens == 4
        stream = await c.complete(messages=MESSAGES, max_tokens=4, temperature=0, stream=True)
        assert "".join([u.choices[0].delta.content or "" async for u in stream if u.choices]) \
            == whole.choices[0].message.content
        info = await c.get_model_info()
        assert info.model_type == "chat_completion"
        with pytest.raises(HttpResponseError) as err:
            await c.complete(messages=MESSAGES, max_tokens=2, temperature=5)
        assert err.value.status_code == 422
