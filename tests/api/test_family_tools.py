"""Tool calling end to end in each family's own format: a tiny random model with the family's real
chat template (tests/family_templates.py) served by `parley serve`, asked through the openai SDK
for a forced call. The answer is written in the family's syntax (seen in its tokens), its
tool_calls parse and validate, streamed and whole alike, and the calls go back through the
family's template in the next turn."""

from __future__ import annotations

import json
import re
import sys

import jsonschema
import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from family_templates import FAMILIES
from server import CLIENT_TIMEOUT_S, ServerProcess
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow

PARAMETERS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False},
    "get_time": {"type": "object", "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
                 "required": ["utc_offset"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"Tool {name} of the test", "parameters": schema}}
         for name, schema in PARAMETERS.items()]
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
# What the family's answer begins with, in its tokens' text (special tokens included).
SYNTAX = {"qwen2.5": "<tool_call>\n{\"name\": \"", "llama3.2": "{\"name\": \"", "mistral-v0.3": "[TOOL_CALLS] [{\"name\": \"",
          "granite-3.1": "<|tool_call|>[{\"name\": \""}
CALL_ID = {"qwen2.5": r"call_[0-9a-f]{24}", "llama3.2": r"call_[0-9a-f]{24}", "mistral-v0.3": r"[A-Za-z0-9]{9}",
           "granite-3.1": r"call_[0-9a-f]{24}"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, an OpenAI client of a server on its tiny model, the model's folder)."""
    arch, template, special, added, _ = FAMILIES[request.param]
    model = make_tiny_model(tmp_path_factory.mktemp(f"{arch}_tools"), arch, seed=11, chat_template=template,
                            special_tokens=tuple(special), added_tokens=tuple(added),
                            max_position_embeddings=2048)  # the tiny vocabulary spells the tools out long
    proc = ServerProcess([sys.executable, "-m", "parley", "serve", "--model-id", model, "--dtype", "float32",
                          "--num-threads", "1", "--max-batch-total-tokens", "4096", "--served-model-name", "m"],
                         tmp_path_factory.mktemp(f"{arch}_tools_server") / "server.log").start()
    yield (request.param, OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S),
           model)
    proc.stop()


def chat(client, **kwargs):
    return client.chat.completions.create(**{"model": "m", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 120,
                                             "temperature": 0, **kwargs})


def check_calls(name: str, calls: list[tuple[str, str, str]]) -> None:
    assert calls
    for call_id, function, arguments in calls:
        assert re.fullmatch(CALL_ID[name], call_id), call_id
        jsonschema.validate(json.loads(arguments), PARAMETERS[function])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_a_forced_call_in_the_family_format_whole_and_streamed(family, choice):
    name, client, _ = family
    whole = chat(client, tool_choice=choice, logprobs=True).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    written = "".join(t.token for t in whole.logprobs.content)
    assert written.startswith(SYNTAX[name]), written  # the family's own syntax, not the default's
    calls = [(c.id, c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    check_calls(name, calls)
    if isinstance(choice, dict):
        assert [function for _, function, _ in calls] == ["get_time"]
    if name == "llama3.2":
        assert len(calls) == 1  # its template renders one call a turn

    streamed: dict[int, list[str]] = {}
    finish = None
    for chunk in chat(client, tool_choice=choice, stream=True):
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            entry = streamed.setdefault(call.index, [call.id, call.function.name, ""])
            entry[2] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    check_calls(name, [tuple(streamed[i]) for i in sorted(streamed)])
    assert [tuple(streamed[i][1:]) for i in sorted(streamed)] == [c[1:] for c in calls]  # greedy: the same calls


def test_the_calls_and_their_results_go_back_through_the_family_template(family):
    name, client, _ = family
    answer = chat(client, tool_choice="required").choices[0].message
    calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in answer.tool_calls]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": '{"ok": true}'} for c in calls]
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": calls}, *results]
    follow_up = chat(client, messages=history, tool_choice="none", max_tokens=5)  # Granite's renders only the results
    assert follow_up.choices[0].finish_reason in ("stop", "length")
    assert follow_up.usage.prompt_tokens > chat(client, tool_choice="none", max_tokens=1).usage.prompt_tokens


def test_the_prompt_holds_the_tools_as_the_family_template_writes_them(family):
    _, client, _ = family
    without = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    with_tools = chat(client, max_tokens=1).usage.prompt_tokens
    assert with_tools > without + 20  # the tools' names, descriptions and schemas


# The token a family's call begins with, pushed up so that the random model calls in "auto".
FIRST_TOKEN = {"qwen2.5": "<tool_call>", "llama3.2": "{", "mistral-v0.3": "[TOOL_CALLS]", "granite-3.1": "<|tool_call|>"}


@pytest.mark.parametrize("nudged", [False, True], ids=["free", "nudged_to_call"])
def test_auto_gives_text_or_valid_calls_in_the_family_format(family, nudged):
    """In "auto" each answer is text, or calls that parse and validate (the special tokens of the
    family's syntax included), streamed as whole. A random model writes text; with the first token
    of a call favoured (logit_bias) it calls, beginning by itself."""
    name, client, model = family
    bias = {}
    if nudged:
        bias = {str(Tokenizer.from_file(f"{model}/tokenizer.json").token_to_id(FIRST_TOKEN[name])): 100}
    called = 0
    for seed in range(4):
        whole = chat(client, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=60,
                     logit_bias=bias).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        if calls:
            called += 1
            check_calls(name, calls)
            assert whole.finish_reason in ("tool_calls", "length")
        else:
            assert whole.finish_reason in ("stop", "length") and whole.message.content is not None
        text, streamed = "", {}
        for chunk in chat(client, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=60, logit_bias=bias,
                          stream=True):
            delta = chunk.choices[0].delta
            text += delta.content or ""
            for call in delta.tool_calls or []:
                streamed.setdefault(call.index, [call.function.name, ""])[1] += call.function.arguments or ""
        assert [tuple(streamed[i]) for i in sorted(streamed)][:len(calls)] == [c[1:] for c in calls]
        if calls or whole.finish_reason == "stop":
            assert text == (whole.message.content or "")
        else:  # a call cut short by max_tokens: the whole answer keeps it as text, the stream announced it
            assert (whole.message.content or "").startswith(text)
    assert called or not nudged  # some answer made complete calls of its own accord
