"""mistralai (3.x): `Mistral(api_key=KEY, server_url=URL)`; the SDK appends /v1/chat/completions."""

from __future__ import annotations

import time

import pytest
from mistralai.client import Mistral
from mistralai.client.errors import HTTPValidationError

from sdk_common import (CITY_SCHEMA, HI, JSON_MESSAGES, KEY, MESSAGES, SAMPLED, WEATHER_MESSAGES, WEATHER_TOOL,
                        assert_city_json, assert_weather_call)

pytestmark = pytest.mark.slow

SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
               "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")


@pytest.fixture
def client(server):
    with Mistral(api_key=KEY, server_url=server.url) as c:
        yield c


def greedy(client, messages=MESSAGES, max_tokens=8, **kwargs):
    return client.chat.complete(model="m", messages=messages, max_tokens=max_tokens, temperature=0, **kwargs)


def test_chat(client):
    r = greedy(client, max_tokens=4)
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_chat_stream(client):
    with client.chat.stream(model="m", messages=MESSAGES, max_tokens=4, temperature=0) as events:
        chunks = [e.data for e in events]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy(client, max_tokens=4).choices[0] \
        .message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_and_random_seed(client):
    first, again = (client.chat.complete(model="m", messages=MESSAGES, n=2, random_seed=7, **SAMPLED)
                    for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


@pytest.mark.parametrize("as_list", [False, True])
def test_stop(client, as_list):
    text = greedy(client).choices[0].message.content
    r = greedy(client, stop=[text[3:5]] if as_list else text[3:5])
    assert r.choices[0].message.content == text[: text.index(text[3:5])] and r.choices[0].finish_reason == "stop"


def test_json_response_format(client):
    r = greedy(client, JSON_MESSAGES, 30, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}})
    assert_city_json(r.choices[0].message.content)


def test_tool_choice_any(client):
    """Mistral's "any" means OpenAI's "required"."""
    r = greedy(client, WEATHER_MESSAGES, 60, tools=[WEATHER_TOOL], tool_choice="any", parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    assert_weather_call(call.function.name, call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"


def test_model_info(client):
    card, alias = client.models.list().data  # the served name and its alias (tests/server.py)
    assert (card.id, alias.id) == ("m", "Qwen/Qwen2.5-7B-Instruct")
    assert card.capabilities.completion_chat and card.max_context_length == 2048


def test_bad_request(client):
    with pytest.raises(HTTPValidationError, match="temperature") as err:
        client.chat.complete(model="m", messages=MESSAGES, max_tokens=2, temperature=5)
    (detail,) = err.value.data.detail
    assert detail.loc == ["body", "temperature"] and "temperature" in detail.msg


def test_logprobs_carry_token_ids_and_bytes(client):
    """Without `token_id` and `bytes` in every entry the SDK silently drops the whole object."""
    entry = greedy(client, max_tokens=2, logprobs=True, top_logprobs=2).choices[0].logprobs.content[0]
    assert bytes(entry.bytes_).decode() == entry.token and entry.token_id >= 0 and len(entry.top_logprobs) == 2


def test_min_tokens_top_k_and_repetition_penalty(client):
    natural = greedy(client, HI, 40)
    assert natural.choices[0].finish_reason == "stop"
    longer = greedy(client, HI, 40, min_tokens=natural.usage.completion_tokens + 5)
    assert longer.usage.completion_tokens >= natural.usage.completion_tokens + 5
    narrowed = client.chat.complete(model="m", messages=MESSAGES, max_tokens=8, temperature=1.5, top_k=1)
    assert narrowed.choices[0].message.content == greedy(client).choices[0].message.content
    penalized = greedy(client, max_tokens=12, repetition_penalty=1.5)
    assert penalized.choices[0].message.content != greedy(client, max_tokens=12).choices[0].message.content


def test_safe_prompt_is_mistral_system_prompt(client):
    guarded = greedy(client, safe_prompt=True)
    explicit = greedy(client, [{"role": "system", "content": SAFE_PROMPT}, *MESSAGES])
    assert guarded.usage.prompt_tokens == explicit.usage.prompt_tokens != greedy(client).usage.prompt_tokens
    assert guarded.choices[0].message.content == explicit.choices[0].message.content


def test_prediction_keeps_the_greedy_output(client):
    """A right prediction is verified as draft tokens: the same answer, sooner. Run with -s to
    see the wall times (not asserted: the machine is shared)."""
    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    started = time.monotonic()
    plain = greedy(client, story, 100).choices[0].message.content
    plain_s = time.monotonic() - started
    started = time.monotonic()
    predicted = greedy(client, story, 100, prediction={"type": "content", "content": plain})
    predicted_s = time.monotonic() - started
    print(f"\n100-token greedy answer: {plain_s:.2f}s plain, {predicted_s:.2f}s with the answer as prediction")
    assert predicted.usage.completion_tokens == 100
    assert predicted.choices[0].message.content == plain


def test_prefix_continues_the_assistant_message(client):
    """The answer is the assistant message sent with `prefix`, continued: Mistral's guide prints it whole."""
    plain = greedy(client).choices[0].message.content
    prefix = plain[: plain.index(" ", 1)]  # the model's own first word
    prefixed = [*MESSAGES, {"role": "assistant", "content": prefix, "prefix": True}]
    r = greedy(client, prefixed)
    assert r.choices[0].message.content.startswith(prefix) and len(r.choices[0].message.content) > len(prefix)
    with client.chat.stream(model="m", messages=prefixed, max_tokens=8, temperature=0) as events:
        assert "".join(e.data.choices[0].delta.content or "" for e in events) == r.choices[0].message.content
    with pytest.raises(HTTPValidationError):  # only the last message can be a prefix
        greedy(client, [*prefixed, *HI])
