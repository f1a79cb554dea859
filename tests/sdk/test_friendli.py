"""friendli (0.16): `SyncFriendli(token=KEY, server_url=URL)`; `dedicated.chat.complete` posts to
/dedicated/v1/chat/completions, `model` being "ENDPOINT_ID[:ADAPTER_ROUTE]". Its default retries
(429/5xx, for up to an hour) are turned off with the documented `retry_config`."""

from __future__ import annotations

import httpx
import pytest
from friendli import SyncFriendli
from friendli.models import SDKError
from friendli.utils import RetryConfig

from sdk_common import (CITY_SCHEMA, JSON_MESSAGES, KEY, MESSAGES, SAMPLED, WEATHER_MESSAGES, WEATHER_TOOL,
                        assert_city_json, assert_weather_call)
from server import CLIENT_TIMEOUT_S

pytestmark = pytest.mark.slow

ENDPOINT = "parley-endpoint"


@pytest.fixture
def client(server):
    with SyncFriendli(token=KEY, server_url=server.url, retry_config=RetryConfig("none", None, False)) as c:
        yield c


def complete(client, **kwargs):
    return client.dedicated.chat.complete(**{"model": ENDPOINT, "messages": MESSAGES, **kwargs})


def test_chat(client):
    r = complete(client, max_tokens=4, temperature=0, x_friendli_team="team-1")
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_chat_stream_with_usage(client):
    events = list(complete(client, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(e.data.choices[0].delta.content or "" for e in events if e.data.choices)
    assert text == complete(client, max_tokens=4, temperature=0).choices[0].message.content
    assert events[-1].data.choices == [] and events[-1].data.usage.completion_tokens == 4


def test_seed_list_gives_each_choice_its_own_seed(client):
    def contents(seed):
        return [c.message.content for c in complete(client, n=2, seed=seed, **SAMPLED).choices]

    first, second = contents([5, 9])
    assert first != second and contents([5, 9]) == [first, second]  # reproducible, choice by choice
    other_first, other_second = contents([7, 9])
    assert other_first != first and other_second == second  # choice 1 follows its own seed only
    assert contents(5) == contents([5, 6])  # a single seed means seed + i for choice i
    assert contents([9, 5]) == [second, first]  # a seed gives the same text at any index


def test_seed_list_of_the_wrong_length_is_422(client):
    with pytest.raises(SDKError) as err:
        complete(client, n=2, seed=[1, 2, 3], **SAMPLED)
    assert err.value.status_code == 422 and "seed" in err.value.body


def test_stop(client):
    text = complete(client, max_tokens=8, temperature=0).choices[0].message.content
    r = complete(client, max_tokens=8, temperature=0, stop=[text[3:5]])
    assert r.choices[0].message.content == text[: text.index(text[3:5])] and r.choices[0].finish_reason == "stop"


def test_eos_token_ends_the_output_at_that_id(client, server):
    # Friendli's SDK drops the token ids of logprobs: read them from the OpenAI-style answer
    answer = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True},
                        timeout=CLIENT_TIMEOUT_S).json()
    ids = [entry["token_id"] for entry in answer["choices"][0]["logprobs"]["content"]]
    eos = next(i for i in ids[1:] if ids.count(i) == 1)  # not the first token, and its only occurrence
    r = complete(client, max_tokens=8, temperature=0, eos_token=[eos])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ids.index(eos) + 1
    assert answer["choices"][0]["message"]["content"].startswith(r.choices[0].message.content)


def test_json_response_format_without_a_name(client):
    r = complete(client, messages=JSON_MESSAGES, max_tokens=30, temperature=0,
                 response_format={"type": "json_schema", "json_schema": {"schema": CITY_SCHEMA}})
    assert_city_json(r.choices[0].message.content)


def test_required_tool_call(client):
    r = complete(client, messages=WEATHER_MESSAGES, max_tokens=60, temperature=0, tools=[WEATHER_TOOL],
                 tool_choice="required", parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    assert_weather_call(call.function.name, call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"


def test_unknown_adapter_is_404_naming_it(client):
    with pytest.raises(SDKError) as err:
        complete(client, model=f"{ENDPOINT}:no-such-adapter", max_tokens=2)
    assert err.value.status_code == 404 and "no-such-adapter" in err.value.body


def test_timeout_microseconds_past_is_429(server):
    """friendli ≥ 0.9 no longer sends `timeout_microseconds` (SDK-WIRE §1.4), so raw HTTP here."""
    r = httpx.post(server.url + "/dedicated/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": ENDPOINT, "messages": MESSAGES, "max_tokens": 50, "timeout_microseconds": 1},
                   timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 429 and "timed out" in r.json()["error"]["message"]


def test_every_choice_returns_the_seed_that_draws_it_again(server):
    """Friendli: "If nothing is given, random seed is used for sampling, and return the seed along
    with the generated result". Its chat SDK drops fields its models do not declare, so raw HTTP."""
    def chat(**kwargs):
        r = httpx.post(server.url + "/dedicated/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": ENDPOINT, "messages": MESSAGES, **kwargs}, timeout=CLIENT_TIMEOUT_S)
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["seed"]

    text, seed = chat(**SAMPLED)  # no seed given: a random one, returned
    assert isinstance(seed, int) and chat(seed=[seed], **SAMPLED) == (text, seed)
    assert chat(seed=[7], **SAMPLED)[1] == 7
    assert chat(max_tokens=3, temperature=0)[1] == 0  # greedy: any seed gives it


def test_completions_choices_carry_their_seed_and_tokens(client):
    """The SDK's completions choice requires `seed` and `tokens`; without them it cannot parse the answer."""
    body = {"model": ENDPOINT, "prompt": "The sun is", "max_tokens": 4, "temperature": 1.0, "seed": [11]}
    choice = client.dedicated.completions.complete(dedicated_completions_body=body).choices[0]
    assert choice.seed == 11 and len(choice.tokens) == 4 and choice.text
