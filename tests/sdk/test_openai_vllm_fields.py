"""vLLM's own fields, as its users send them through the openai SDK's `extra_body`: structured_outputs
(and the guided_* fields before it), ignore_eos, stop_token_ids, include_stop_str_in_output,
skip_special_tokens, truncate_prompt_tokens, cache_salt (response_format.py, dialects.FIELDS)."""

from __future__ import annotations

import json
import re
import uuid

import openai
import pytest
from openai import OpenAI

from sdk_common import CITY_SCHEMA, JSON_MESSAGES, KEY, MESSAGES, WEATHER_MESSAGES, WEATHER_TOOL, assert_city_json

pytestmark = pytest.mark.slow

SEEDS = range(4)
YES_NO = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]
GRAMMAR = 'start: "The answer is " ("yes" | "no") "."'


@pytest.fixture
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def sampled(client, extra_body: dict, messages=YES_NO, max_tokens=40) -> list[openai.types.chat.ChatCompletion]:
    """One answer a seed, sampled hot, so that a constraint that did nothing would show."""
    return [client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=1.5,
                                           seed=seed, extra_body=extra_body) for seed in SEEDS]


def texts(answers) -> list[str]:
    return [a.choices[0].message.content for a in answers]


@pytest.mark.parametrize("field", ["structured_outputs", "guided"])
def test_choice_is_exactly_one_of_the_strings(client, field):
    choices = ["yes", "no", 'perhaps "ñ" \\ so']  # quotes, a backslash and non-ASCII reach the grammar intact
    body = {"structured_outputs": {"choice": choices}} if field == "structured_outputs" else {"guided_choice": choices}
    answers = sampled(client, body)
    assert all(text in choices for text in texts(answers)), texts(answers)
    assert {a.choices[0].finish_reason for a in answers} == {"stop"}
    only = {"structured_outputs": {"choice": choices[2:]}} if field == "structured_outputs" else {
        "guided_choice": choices[2:]}
    assert texts(sampled(client, only))[0] == choices[2]


@pytest.mark.parametrize("body", [{"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
                                  {"guided_regex": "[0-9]{3}-[a-z]{2}"}])
def test_regex(client, body):
    for text in texts(sampled(client, body)):
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", text), text


@pytest.mark.parametrize("body", [{"structured_outputs": {"json": CITY_SCHEMA}}, {"guided_json": CITY_SCHEMA},
                                  {"guided_json": json.dumps(CITY_SCHEMA)}])
def test_json_schema(client, body):
    r = client.chat.completions.create(model="m", messages=JSON_MESSAGES, max_tokens=60, temperature=0,
                                       extra_body=body)
    assert_city_json(r.choices[0].message.content)


@pytest.mark.parametrize("body", [{"structured_outputs": {"grammar": GRAMMAR}}, {"guided_grammar": GRAMMAR}])
def test_lark_grammar(client, body):
    for text in texts(sampled(client, body)):
        assert text in ("The answer is yes.", "The answer is no."), text


def test_json_object(client):
    r = client.chat.completions.create(model="m", messages=YES_NO, max_tokens=8, temperature=0,
                                       extra_body={"structured_outputs": {"json_object": True}})
    assert r.choices[0].message.content.startswith("{"), r.choices[0].message.content


def test_completions_take_them_too(client):
    r = client.completions.create(model="m", prompt="Is Paris in France?", max_tokens=8, temperature=1.5, seed=1,
                                  extra_body={"guided_choice": ["Oui", "Non"]})
    assert r.choices[0].text in ("Oui", "Non")


@pytest.mark.parametrize("body, field", [
    ({"guided_json": CITY_SCHEMA, "response_format": {"type": "json_object"}}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"guided_regex": "("}, "guided_regex"),  # the engine's grammar error, named as the client sent it
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs.grammar"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
])
def test_bad_or_conflicting_fields_are_refused_by_name(client, body, field):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, extra_body=body)
    assert err.value.body["param"] == field, err.value.body


def test_a_grammar_and_tools_are_refused_together(client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="m", messages=WEATHER_MESSAGES, max_tokens=4, tools=[WEATHER_TOOL],
                                       extra_body={"guided_choice": ["a"]})
    assert err.value.body["param"] == "guided_choice"


def test_ignore_eos_goes_on_past_the_end_of_sequence_token(client):
    force_eos = {"logit_bias": {"2": 100}}  # <|im_end|>, the default model's end-of-sequence token
    ended = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5, extra_body=force_eos)
    assert (ended.choices[0].finish_reason, ended.usage.completion_tokens) == ("stop", 1)
    on = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5,
                                        extra_body={**force_eos, "ignore_eos": True})
    assert (on.choices[0].finish_reason, on.usage.completion_tokens) == ("length", 5)


def test_stop_token_ids_end_the_answer(client):
    force = {"logit_bias": {"28": 100}}  # ","
    plain = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, extra_body=force)
    assert (plain.choices[0].finish_reason, plain.usage.completion_tokens) == ("length", 3)
    stopped = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3,
                                             extra_body={**force, "stop_token_ids": [28]})
    # as vLLM's: the answer ends at the token, which is not in its text unless include_stop_str_in_output
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 1)
    assert stopped.choices[0].message.content == ""
    kept = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, extra_body={
        **force, "stop_token_ids": [28], "include_stop_str_in_output": True})
    assert kept.choices[0].message.content == ","


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output_keeps_the_stop_string(client, stream):
    def answer(**extra_body) -> str:
        r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=30, temperature=0,
                                           stop=["sun"], stream=stream, extra_body=extra_body)
        if not stream:
            return r.choices[0].message.content
        return "".join(chunk.choices[0].delta.content or "" for chunk in r if chunk.choices)
    plain, kept = answer(), answer(include_stop_str_in_output=True)
    assert "sun" not in plain and kept == plain + "sun", (plain, kept)


def test_cache_salt_keeps_prompts_apart_in_the_prefix_cache(client):
    # from its first block on, a prompt no earlier test cached (the template writes the system message first)
    messages = [{"role": "system", "content": uuid.uuid4().hex}, {"role": "user", "content": "word " * 100}]

    def cached(**extra_body) -> int:
        usage = client.chat.completions.create(model="m", messages=messages, max_tokens=1,
                                               extra_body=extra_body).usage
        return usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0

    assert cached(cache_salt="tenant a") == 0
    assert cached(cache_salt="tenant a") >= 96  # its own earlier prompt
    assert cached(cache_salt="tenant b") == 0  # another salt does not see it
    assert cached() == 0  # nor does no salt
    assert cached() >= 96


@pytest.mark.parametrize("stream", [False, True])
def test_skip_special_tokens_false_writes_them(client, stream):
    def answer(**extra_body) -> str:
        r = client.completions.create(model="m", prompt="Hello", max_tokens=2, stream=stream,
                                      extra_body={"logit_bias": {"1": 100}, **extra_body})  # <|im_start|>, special
        return "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
    assert answer() == ""
    assert answer(skip_special_tokens=False) == "<|im_start|><|im_start|>"


def test_truncate_prompt_tokens_reads_the_prompts_last_tokens(client):
    """A prompt past the server's --max-total-tokens (2,048, tests/server.py) is read by its end."""
    long = [100 + i % 500 for i in range(3000)]  # token ids, so that its end is known exactly
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="m", prompt=long, max_tokens=1)
    r = client.completions.create(model="m", prompt=long, max_tokens=4, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 8})
    end = client.completions.create(model="m", prompt=long[-8:], max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == 8 and r.choices[0].text == end.choices[0].text
    start = client.completions.create(model="m", prompt=long[:8], max_tokens=4, temperature=0)
    assert start.choices[0].text != end.choices[0].text  # the two ends answer apart: which one was read shows
    # the default output budget is what the context leaves after the truncated prompt (completions: 32 at most)
    budget = client.completions.create(model="m", prompt=long,
                                       extra_body={"truncate_prompt_tokens": 8, "min_tokens": 32})
    assert budget.usage.completion_tokens == 32
