"""Fields inside `messages`: each has its effect, or is refused naming it as `messages.N.NAME`.
SDKs echo an earlier answer's fields back, so the ones OpenAI's and Mistral's send are known."""

from __future__ import annotations

import pytest


def chat(http, messages, **body):
    return http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **body})


def test_an_unknown_message_field_is_refused_by_name(http):
    r = chat(http, [{"role": "user", "content": "Hi", "colour": "blue"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.colour", r.text
    r = chat(http, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "audio": {"id": "a1"}},
                    {"role": "user", "content": "Again"}])
    assert r.status_code == 400 and "messages.1.audio" in r.json()["error"]["message"], r.text
    r = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}})  # TGI's body unchanged
    assert r.status_code == 200


def test_nulls_and_what_sdks_send_by_default_are_fine(http):
    # the openai SDK's echo of an answer: refusal/audio/annotations null or empty; Mistral's prefix false
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello", "refusal": None, "audio": None, "annotations": [],
                "function_call": None, "prefix": False},
               {"role": "user", "content": "Again"}]
    assert chat(http, history).status_code == 200


def test_what_cannot_be_honoured_is_refused(http):  # Mistral's prefix: tests/api/test_assistant_prefix.py
    r = chat(http, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel",
                                                       "annotations": [{"type": "url_citation"}]}])
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("messages.1.annotations"), r.text


def test_an_earlier_refusal_reaches_the_template_as_that_turns_content(http):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "refusal": "I cannot say ZEBRA."},
               {"role": "user", "content": "Why?"}]
    with_refusal = chat(http, history).json()["usage"]["prompt_tokens"]
    history[1]["refusal"] = None
    history[1]["content"] = ""
    assert with_refusal > chat(http, history).json()["usage"]["prompt_tokens"]
