"""TGI-native routes driven by TGI's own client (text-generation), huggingface_hub and raw HTTP."""

from __future__ import annotations

import json
import re

import pytest
from huggingface_hub import InferenceClient
from text_generation import Client
from text_generation.types import Grammar, GrammarType

from server import CLIENT_TIMEOUT_S, sse_events

PROMPT = "The capital of France is"


@pytest.fixture
def tgi(server):
    return Client(server.url, timeout=CLIENT_TIMEOUT_S)


def test_generate_with_details_prefill_and_top_tokens(tgi, server):
    r = tgi.generate(PROMPT, max_new_tokens=5, decoder_input_details=True, top_n_tokens=2)
    d = r.details
    assert d.finish_reason.value == "length" and d.generated_tokens == 5 == len(d.tokens)
    assert r.generated_text == "".join(t.text for t in d.tokens)
    assert [t.text for t in d.prefill] == ["The", " capital", " of", " France", " is"]
    assert d.prefill[0].logprob is None and all(t.logprob < 0 for t in d.prefill[1:])
    assert len(d.top_tokens) == 5 and all(len(top) == 2 for top in d.top_tokens)
    assert all(top[0].id == t.id for top, t in zip(d.top_tokens, d.tokens))  # greedy: the top token


def test_greedy_is_deterministic_and_seed_reproduces_sampling(tgi):
    assert tgi.generate(PROMPT, max_new_tokens=6).generated_text == tgi.generate(PROMPT, max_new_tokens=6).generated_text
    a = tgi.generate(PROMPT, max_new_tokens=6, do_sample=True, temperature=1.5, seed=7)
    b = tgi.generate(PROMPT, max_new_tokens=6, do_sample=True, temperature=1.5, seed=7)
    assert a.generated_text == b.generated_text and a.details.seed == 7


def test_stop_sequence_and_return_full_text(tgi):
    full = tgi.generate(PROMPT, max_new_tokens=6).generated_text  # " Paris.\n\nThe answer"
    stop = full[3:5]
    r = tgi.generate(PROMPT, max_new_tokens=6, stop_sequences=[stop], return_full_text=True)
    assert r.details.finish_reason.value == "stop_sequence"
    assert r.generated_text == PROMPT + full[: full.index(stop)]


def test_best_of_returns_best_by_mean_logprob(tgi):
    r = tgi.generate(PROMPT, max_new_tokens=4, best_of=2, do_sample=True, decoder_input_details=True)
    others = r.details.best_of_sequences
    assert len(others) == 1
    assert len(r.details.prefill) == len(others[0].prefill) == 5

    def mean(tokens):
        return sum(t.logprob for t in tokens) / len(tokens)

    assert mean(r.details.tokens) >= mean(others[0].tokens)


def test_generate_stream(tgi):
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=5))
    assert len(events) == 5 and all(e.details is None for e in events[:-1])
    assert events[-1].details.finish_reason.value == "length" and events[-1].details.generated_tokens == 5
    assert events[-1].generated_text == "".join(e.token.text for e in events)


def test_regex_grammar(tgi):
    r = tgi.generate("My phone number is", max_new_tokens=12,
                     grammar=Grammar(type=GrammarType.Regex, value=r"\d{3}-\d{4}"))
    assert re.fullmatch(r"\d{3}-\d{4}", r.generated_text)


def test_huggingface_hub_text_generation(server):
    client = InferenceClient(model=server.url, provider="hf-inference")
    out = client.text_generation(PROMPT, max_new_tokens=4, details=True)
    assert out.details.generated_tokens == 4 and out.generated_text
    chunks = list(client.text_generation(PROMPT, max_new_tokens=4, stream=True))
    assert "".join(chunks) == out.generated_text


def test_compat_route_answers_a_list_and_generate_an_object(http):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": False}}
    listed = http.post("/", json=body).json()
    single = http.post("/generate", json=body).json()
    assert listed == [single] and set(single) == {"generated_text"}


def test_stream_is_chosen_by_body_not_accept_header(http):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    headers = {"accept": "text/event-stream"}
    assert isinstance(http.post("/", json=body, headers=headers).json(), list)
    with http.stream("POST", "/", json={**body, "stream": True}, headers={"accept": "application/json"}) as r:
        events = [json.loads(e) for e in sse_events(r)]  # TGI streams end without [DONE]
    assert [e["index"] for e in events] == [1, 2] and events[-1]["generated_text"]


def test_generate_stream_route(http):
    with http.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}) as r:
        events = [json.loads(e) for e in sse_events(r)]
    assert len(events) == 3 and events[-1]["details"]["finish_reason"] == "length"


def test_text_generation_client_sends_nulls(http):
    """text-generation sends every parameter, unset ones as null (an unknown field is refused by name:
    tests/api/test_openai_routes.py)."""
    params = dict.fromkeys(["best_of", "repetition_penalty", "frequency_penalty", "seed", "temperature", "top_k",
                            "top_p", "truncate", "typical_p", "top_n_tokens", "grammar", "adapter_id"])
    body = {"inputs": PROMPT, "stream": False, "unknown": None,
            "parameters": {**params, "max_new_tokens": 2, "stop": [], "do_sample": False, "details": True,
                           "watermark": False, "return_full_text": False, "decoder_input_details": False}}
    r = http.post("/?api-version=2024-05-01-preview", json=body)
    assert r.status_code == 200 and r.json()[0]["details"]["generated_tokens"] == 2


def test_truncate_keeps_the_last_prompt_tokens(http):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1, "truncate": 2, "decoder_input_details": True}}
    prefill = http.post("/generate", json=body).json()["details"]["prefill"]
    assert [t["text"] for t in prefill] == [" France", " is"]


def test_tokenize(http):
    tokens = http.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [("Hello", 0, 5), (" world", 5, 11)]
    assert all(isinstance(t["id"], int) for t in tokens)
