"""Chat and completions routes driven by the openai SDK, huggingface_hub, text-generation and raw HTTP."""

from __future__ import annotations

import json

import openai
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from text_generation import Client
from text_generation.types import Message

from server import CLIENT_TIMEOUT_S, sse_events

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def oai(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_shape(oai, server):
    r = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and isinstance(r.created, int)
    assert r.system_fingerprint and r.model
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5
    raw = oai.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, max_tokens=2).http_response.json()
    assert raw["choices"][0]["logprobs"] is None and raw["choices"][0]["message"]["tool_calls"] is None


def test_chat_n_seed_and_logprobs(oai):
    kwargs = dict(model="m", messages=MESSAGES, max_tokens=4, n=2, seed=11, temperature=1.0, logprobs=True,
                  top_logprobs=2)
    a, b = oai.chat.completions.create(**kwargs), oai.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 8
    entry = a.choices[0].logprobs.content[0]
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode() == entry.token
    assert entry.model_extra["token_id"] == entry.top_logprobs[0].model_extra["token_id"] or entry.logprob < 0


def test_chat_greedy_stop(oai):
    full = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    stop = text[4:6]
    r = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0, stop=stop)
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_stream_with_usage(oai):
    stream = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    greedy = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0)
    assert content == greedy.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_stream_framing(http):
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True, "n": 2}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"accept": "application/json"}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        for choice in c["choices"]:
            assert choice["delta"]["role"] == "assistant" and "tool_calls" in choice["delta"]
            assert "finish_reason" in choice and "logprobs" in choice
    finals = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(c["choices"][0]["index"] for c in finals) == [0, 1]
    assert finals[-1]["usage"]["completion_tokens"] == 6  # usage rides on the last final chunk


@pytest.mark.parametrize("path, model", [("/chat/completions?api-version=2024-05-01-preview", "m"),
                                         ("/models/chat/completions?api-version=2024-05-01-preview", None),
                                         ("/dedicated/v1/chat/completions", "endpoint")])
def test_chat_route_aliases(http, path, model):
    r = http.post(path, json={"messages": MESSAGES, "max_tokens": 1, "model": model})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_a_model_not_served_is_a_404_naming_what_is(oai, http):
    # the test server runs with --served-model-name m --served-model-name Qwen/Qwen2.5-7B-Instruct
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Hi"})):
        r = http.post(path, json={**body, "model": "gpt-9000", "max_tokens": 1})
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["param"] == "model" and error["code"] == "model_not_found"
        assert "`gpt-9000`" in error["message"] and "`m`, `Qwen/Qwen2.5-7B-Instruct`" in error["message"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-9000", messages=MESSAGES, max_tokens=1)
    # an alias is served under the first name; TGI's clients' names and no name at all are served too
    for model in ("Qwen/Qwen2.5-7B-Instruct", "tgi", "dummy", None):
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "model": model})
        assert r.status_code == 200 and r.json()["model"] == "m", (model, r.text)
    cards = http.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards][:2] == ["m", "Qwen/Qwen2.5-7B-Instruct"]
    assert http.get("/info").json()["served_model_names"] == ["m", "Qwen/Qwen2.5-7B-Instruct"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "temprature": 0}, 400, "temprature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "unknown": None}, 200, None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "logprob": 1}, 400, "logprob"),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "temprature": 0.5}}, 422,
     "parameters.temprature"),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}, "stream": True}, 422, "stream"),
    ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}, "stream": False}, 200, None),
])
def test_unknown_fields_are_refused_naming_them(http, path, body, status, param):
    """Nothing silently ignored: a typo'd `temprature` used to sample at temperature 1 without a word."""
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    if param:
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert f"`{param}`" in message and "--unknown-fields" in message
        assert not isinstance(error, dict) or error["param"] == param


def test_completions_string_and_list(oai):
    one = oai.completions.create(model="m", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert one.object == "text_completion" and one.choices[0].finish_reason == "length"
    many = oai.completions.create(model="m", prompt=["Once upon a time", "Hello"], max_tokens=3, temperature=0, n=2,
                                  logprobs=1)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == one.choices[0].text
    assert len(many.choices[0].logprobs.tokens) == 3 and len(many.choices[0].logprobs.top_logprobs[0]) == 1
    assert many.usage.completion_tokens == 12


def test_completions_take_token_ids(oai, http):
    """OpenAI's prompt forms beyond text: one prompt's token ids, or a batch of them; as given, no
    special token added."""
    ids = [t["id"] for t in http.post("/tokenize", json={"inputs": "Once upon a time"}).json()]
    text = oai.completions.create(model="m", prompt="Once upon a time", max_tokens=4, temperature=0)
    one = oai.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0)
    assert one.choices[0].text == text.choices[0].text and one.usage.prompt_tokens == len(ids)
    many = oai.completions.create(model="m", prompt=[ids, ids[:2]], max_tokens=4, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == text.choices[0].text
    assert many.usage.prompt_tokens == len(ids) + 2


def test_completions_echo_the_prompt_with_its_logprobs(oai, http):
    ids = [t["id"] for t in http.post("/tokenize", json={"inputs": "Once upon a time"}).json()]
    plain = oai.completions.create(model="m", prompt="Once upon a time", max_tokens=3, temperature=0, logprobs=2)
    r = oai.completions.create(model="m", prompt="Once upon a time", max_tokens=3, temperature=0, logprobs=2, echo=True)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == "Once upon a time" + plain.choices[0].text
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[len(ids):] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[len(ids):] == plain.choices[0].logprobs.token_logprobs
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens[1:len(ids)], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 2 and max(top.values()) >= logprob and (token not in top or top[token] == logprob)
    tgi = http.post("/generate", json={"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 1, "decoder_input_details": True}}).json()["details"]["prefill"]
    assert lp.token_logprobs[: len(ids)] == [t["logprob"] for t in tgi]  # the same computation as TGI's
    assert oai.completions.create(model="m", prompt=ids, max_tokens=3, temperature=0, echo=True).choices[0].text == \
        choice.text  # ids: the text of their tokens


def test_completions_echo_scores_a_continuation_as_lm_eval_does(http):
    """lm-evaluation-harness's local-completions scores a context and a continuation, sent as token
    ids, with echo, logprobs 1 and max_tokens 1: the continuation's logprobs, and whether each of
    its tokens is its position's most likely. The model's own greedy continuation scores as greedy,
    with the logprobs it was generated with."""
    context = [t["id"] for t in http.post("/tokenize", json={"inputs": "The capital of France is"}).json()]
    generated = http.post("/generate", json={"inputs": "The capital of France is", "parameters": {
        "max_new_tokens": 4, "details": True}}).json()["details"]["tokens"]
    body = {"prompt": [context + [t["id"] for t in generated]], "max_tokens": 1, "temperature": 0, "logprobs": 1,
            "echo": True}
    logprobs = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    scored, tops = logprobs["token_logprobs"][len(context) : -1], logprobs["top_logprobs"][len(context) : -1]
    assert scored == pytest.approx([t["logprob"] for t in generated], rel=1e-5)
    assert all(logprob == max(top.values()) for logprob, top in zip(scored, tops, strict=True))


def test_completions_echo_takes_a_scored_context_from_the_prefix_cache(oai):
    """A multiple-choice task's endings after one context: the second and later take the context
    from the prefix cache, its logprobs and alternatives with it (cached_tokens), and score it as
    the first did."""
    context = "Question: " + " ".join(f"item {i} weighs {i * 7 % 11} grams." for i in range(12)) + " Answer:"
    scored = [oai.completions.create(model="m", prompt=context + ending, max_tokens=1, temperature=0, logprobs=2,
                                     echo=True) for ending in (" heavy", " light", " none")]
    first = scored[0].choices[0].logprobs
    shared = len(first.tokens) - 3  # the context's tokens, before the endings' (and the one generated)
    assert not (scored[0].usage.prompt_tokens_details and scored[0].usage.prompt_tokens_details.cached_tokens)
    for r in scored[1:]:
        assert r.usage.prompt_tokens_details.cached_tokens >= 32
        lp = r.choices[0].logprobs
        assert lp.tokens[:shared] == first.tokens[:shared]
        assert lp.token_logprobs[:shared] == first.token_logprobs[:shared]
        assert lp.top_logprobs[:shared] == first.top_logprobs[:shared]


@pytest.mark.parametrize("extra, path", [({"stream": True}, "/v1/completions"), ({"n": 2}, "/v1/completions"),
                                         ({}, "/dedicated/v1/completions")])
def test_completions_echo_refused_where_it_cannot_be_kept(http, extra, path):
    r = http.post(path, json={"prompt": "Hi", "max_tokens": 2, "echo": True, **extra})
    assert r.status_code == 422 and "`echo`" in r.text, r.text


def test_completions_stream(oai):
    chunks = list(oai.completions.create(model="m", prompt=["Once upon a time", "Hello"], max_tokens=3,
                                         temperature=0, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    batch = oai.completions.create(model="m", prompt=["Once upon a time", "Hello"], max_tokens=3, temperature=0)
    assert texts == {c.index: c.text for c in batch.choices}


def test_models(oai):
    models = oai.models.list().data  # the served name, then its alias (tests/server.py)
    assert [m.id for m in models] == ["m", "Qwen/Qwen2.5-7B-Instruct"]


def test_huggingface_hub_chat(server):
    client = InferenceClient(base_url=server.url)
    out = client.chat_completion(MESSAGES, max_tokens=3, temperature=0)
    assert out.choices[0].message.content and out.usage.completion_tokens == 3
    chunks = list(client.chat_completion(MESSAGES, max_tokens=3, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


def test_text_generation_chat(server):
    """text-generation's chat sends every field, nulls included (`name`, `tool_calls` in messages)."""
    r = Client(server.url, timeout=CLIENT_TIMEOUT_S).chat([Message(role="user", content="Hi")], max_tokens=2, seed=1)
    assert r.choices[0].message.role == "assistant" and r.usage["completion_tokens"] == 2


def test_chat_accepts_content_chunks_and_developer_role(http):
    body = {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 1}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_default_max_tokens_fills_the_context(http):
    """Chat without max_tokens: the budget is max_total_tokens (2048 here) minus the prompt, as in
    TGI (completions default to 32, TGI's spec's default: see below)."""
    unit = len(http.post("/tokenize", json={"inputs": "hello " * 10}).json()) / 10
    messages = [{"role": "user", "content": "hello " * int(2000 / unit)}]
    prompt_tokens = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    r = http.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "min_tokens": 2048 - prompt_tokens})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": 2048 - prompt_tokens, "total_tokens": 2048}
    assert 0 < cached < prompt_tokens  # the same prompt was computed by the request before


def test_usage_reports_the_prompt_tokens_the_prefix_cache_held(http):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: whole KV blocks (16 tokens) of the prompt
    found in the prefix cache, never its last block; /metrics counts them too."""
    from server import metric

    body = {"messages": [{"role": "user", "content": "Tell me about prefix caching. " * 8}], "max_tokens": 1}
    first = http.post("/v1/chat/completions", json=body).json()["usage"]
    hits = metric(http.get("/metrics").text, "parley_prefix_cache_hit_tokens_total")
    second = http.post("/v1/chat/completions", json={**body, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    usage = json.loads(sse_events(second)[-2])["usage"]
    prompt, cached = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
    assert prompt == first["prompt_tokens"] and first["prompt_tokens_details"]["cached_tokens"] < prompt - 16
    assert cached == (prompt - 1) // 16 * 16  # every whole block but the one holding the last token
    assert metric(http.get("/metrics").text, "parley_prefix_cache_hit_tokens_total") == hits + cached


@pytest.mark.parametrize("path", ["/models/chat/completions", "/chat/completions", "/models/info", "/info"])
def test_an_azure_api_version_not_implemented_is_refused(http, path):
    body = {"messages": MESSAGES, "max_tokens": 1}
    send = (lambda query: http.get(path + query)) if path.endswith("info") else \
        (lambda query: http.post(path + query, json=body))
    assert send("?api-version=2024-05-01-preview").status_code == 200  # what azure-ai-inference sends
    r = send("?api-version=1999-01-01")
    assert r.status_code == 400 and "`api-version` '1999-01-01'" in r.text and "2024-05-01-preview" in r.text


def test_completions_default_to_32_tokens_as_tgis_spec_says(http):
    r = http.post("/v1/completions", json={"model": "m", "prompt": "Once upon a time", "min_tokens": 32})
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert (choice["finish_reason"], usage["completion_tokens"]) == ("length", 32), r.text
