"""Fill in the middle: OpenAI's completions `suffix` and Mistral's `client.fim`, on a tiny model whose
vocabulary has Qwen2.5-Coder's markers (the `infiller` fixture) and on the default model, which has
none (tokenization/infill.py)."""

from __future__ import annotations

import httpx
import openai
import pytest
from mistralai.client import Mistral

from server import CLIENT_TIMEOUT_S
from tiny_model import INFILL_TOKENS

PREFIX, SUFFIX = "def add(a, b):\n", "\nprint(add(2, 3))"
ARRANGED = f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
GREEDY = {"max_tokens": 8, "temperature": 0}


@pytest.fixture
def coder(infiller):
    with httpx.Client(base_url=infiller.url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture
def openai_coder(infiller):
    return openai.OpenAI(base_url=infiller.url + "/v1", api_key="-", timeout=CLIENT_TIMEOUT_S, max_retries=0)


@pytest.fixture
def mistral_coder(infiller):
    with Mistral(api_key="-", server_url=infiller.url, timeout_ms=CLIENT_TIMEOUT_S * 1000) as client:
        yield client


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "coder", **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def token_id(client, text: str) -> int:
    (token,) = client.post("/tokenize", json={"inputs": text}).json()
    return token["id"]


def test_suffix_arranges_the_prompt_around_the_gap(coder, openai_coder):
    """The openai SDK's `suffix`: the model reads prefix marker, prompt, suffix marker, suffix, middle
    marker, as a plain completion of that text does (and not the prompt alone)."""
    filled = openai_coder.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, **GREEDY)
    arranged = complete(coder, prompt=ARRANGED)
    alone = complete(coder, prompt=PREFIX)
    assert filled.choices[0].text == arranged["choices"][0]["text"]
    assert filled.usage.prompt_tokens == arranged["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 3
    # a prompt given as token ids gets the same markers around it
    ids = [t["id"] for t in coder.post("/tokenize", json={"inputs": PREFIX}).json()]
    assert complete(coder, prompt=ids, suffix=SUFFIX)["choices"][0]["text"] == filled.choices[0].text


@pytest.mark.parametrize("end", [t for t in INFILL_TOKENS if t != "<|fim_prefix|>"] + ["<|endoftext|>"])
def test_the_tokens_that_end_a_middle_end_it(coder, end):
    """A model trained on repositories ends the middle with padding, a file separator or a marker: with a
    suffix those stop it as its end-of-sequence token does; a plain completion goes on past them."""
    force = {"logit_bias": {str(token_id(coder, end)): 100}, "max_tokens": 3}
    filled = complete(coder, prompt=PREFIX, suffix=SUFFIX, **force)
    assert (filled["choices"][0]["finish_reason"], filled["usage"]["completion_tokens"]) == ("stop", 1)
    plain = complete(coder, prompt=PREFIX, **force)
    assert (plain["choices"][0]["finish_reason"], plain["usage"]["completion_tokens"]) == ("length", 3)


def test_echo_with_a_suffix_is_refused(coder):
    r = coder.post("/v1/completions", json={"model": "coder", "prompt": PREFIX, "suffix": SUFFIX, "echo": True})
    assert r.status_code == 422 and r.json()["error"]["param"] == "echo", r.text


def test_mistral_fim_fills_the_gap_and_streams_it(coder, mistral_coder):
    expected = complete(coder, prompt=PREFIX, suffix=SUFFIX)["choices"][0]["text"]
    r = mistral_coder.fim.complete(model="coder", prompt=PREFIX, suffix=SUFFIX, **GREEDY)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "length"
    with mistral_coder.fim.stream(model="coder", prompt=PREFIX, suffix=SUFFIX, **GREEDY) as events:
        assert "".join(e.data.choices[0].delta.content or "" for e in events) == expected
    # without a suffix, Mistral's documents say, it completes the prompt; its seed is honoured
    plain = mistral_coder.fim.complete(model="coder", prompt=PREFIX, **GREEDY)
    assert plain.choices[0].message.content == complete(coder, prompt=PREFIX)["choices"][0]["text"]
    seeded = [mistral_coder.fim.complete(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=1,
                                         random_seed=seed).choices[0].message.content for seed in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2]
    assert mistral_coder.models.list().data[0].capabilities.completion_fim


def test_mistral_fim_refuses_fields_it_does_not_know_by_name(coder):
    r = coder.post("/v1/fim/completions", json={"model": "coder", "prompt": PREFIX, "metadata": {"a": "b"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata", r.text


def test_a_model_without_the_markers_refuses_a_suffix_by_name(http):
    """The default model (SmolLM2) has no fill-in-the-middle tokens."""
    for route in ("/v1/completions", "/v1/fim/completions"):
        r = http.post(route, json={"model": "m", "prompt": "def f(", "suffix": "return x", "max_tokens": 4})
        assert r.status_code == 422 and r.json()["error"]["param"] == "suffix", r.text
        assert "fills in the middle" in r.json()["error"]["message"]
    cards = http.get("/v1/models").json()["data"]
    assert cards[0]["capabilities"]["completion_fim"] is False
