"""Each accepted sampling parameter reaches the engine: the output changes (or collapses to greedy)
exactly as the parameter says."""

from __future__ import annotations

import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SAMPLED = {"do_sample": True, "seed": 3, "temperature": 1.5}


def generate(http, **parameters) -> str:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, **parameters}})
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def chat(http, **body) -> str:
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 12, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"top_p": 0.001}])
def test_tgi_filters_narrowing_sampling_to_greedy(http, narrowing):
    assert generate(http, **SAMPLED) != generate(http)
    assert generate(http, **SAMPLED, **narrowing) == generate(http)


@pytest.mark.parametrize("base, knob", [({}, {"repetition_penalty": 1.5}), ({}, {"frequency_penalty": 1.5}),
                                        (SAMPLED, {"typical_p": 0.001}), (SAMPLED, {"watermark": True})])
def test_tgi_knobs_change_the_output(http, base, knob):
    assert generate(http, **base, **knob) != generate(http, **base)


def test_tgi_unknown_adapter_is_404(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404 and r.json()["error_type"] == "not_found" and "nope" in r.json()["error"]


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 0.001}])
def test_chat_filters_narrowing_sampling_to_greedy(http, narrowing):
    assert chat(http, temperature=1.5, seed=3, **narrowing) == chat(http, temperature=0)


@pytest.mark.parametrize("knob", [{"presence_penalty": 2}, {"frequency_penalty": 2}, {"repetition_penalty": 1.5}])
def test_chat_penalties_change_the_output(http, knob):
    # The tokens' logprobs, not only the text: a short answer that repeats no token keeps its words
    # under a penalty, but from its second token on every distribution it is drawn from changes.
    def tokens(**body):
        r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 12, "logprobs": True, **body})
        assert r.status_code == 200, r.text
        return [(t["token"], t["logprob"]) for t in r.json()["choices"][0]["logprobs"]["content"]]

    assert tokens(temperature=0, **knob) != tokens(temperature=0)


def test_chat_logit_bias_bans_a_token(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1, "temperature": 0, "logprobs": True})
    first = r.json()["choices"][0]["logprobs"]["content"][0]["token_id"]
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1, "temperature": 0, "logprobs": True,
                                                "logit_bias": {str(first): -100}})
    assert r.json()["choices"][0]["logprobs"]["content"][0]["token_id"] != first, r.json()["choices"][0]["logprobs"]


def test_chat_logit_bias_as_tgis_array_of_biases_by_token_id(http):
    # TGI's spec types chat logit_bias as an array: element i is token i's bias
    chosen = 1000
    biases = [0.0] * chosen + [100.0]
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "temperature": 0, "logprobs": True,
                                                "logit_bias": biases})
    assert [t["token_id"] for t in r.json()["choices"][0]["logprobs"]["content"]] == [chosen, chosen], r.text
    too_long = [0.0] * 60_000  # more tokens than the vocabulary (49,152)
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1, "logit_bias": too_long[:-1] + [1.0]})
    assert r.status_code == 422 and "logit_bias" in r.text
