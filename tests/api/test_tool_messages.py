"""How a chat with tools reaches the chat template (no server): a template that knows tools gets them
and the history as is; for one that does not, both are written as text."""

from __future__ import annotations

import json

from parley.api.openai.tool_calls import ToolPlan, template_inputs
from parley.tokenization.chat_template import ChatTemplate

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
PLAN = ToolPlan(TOOLS, "auto", True, None)
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]
TOOL_AWARE = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m['role'] }}{% endfor %}"


def test_a_template_that_knows_tools_gets_them():
    messages, kwargs = template_inputs(HISTORY, PLAN, TOOL_AWARE)
    assert messages == HISTORY and kwargs == {"tools": TOOLS}
    assert template_inputs(HISTORY, None, TOOL_AWARE) == (HISTORY, {})


def test_tools_and_history_as_text():
    messages, kwargs = template_inputs([{"role": "system", "content": "Be brief."}, *HISTORY], PLAN, None)
    assert kwargs == {}
    system, _, assistant, result = messages
    assert system["content"].startswith("Be brief.\n\n") and json.dumps(TOOLS[0]["function"]) in system["content"]
    assert assistant == {"role": "assistant", "content": 'Let me check.<tool_call>{"name": "get_weather", '
                                                         '"arguments": {"city": "Paris"}}</tool_call>'}
    assert result == {"role": "user", "content": 'The get_weather function returned: {"temp_c": 21}'}


def test_a_system_message_is_added_for_the_tools():
    messages, _ = template_inputs(HISTORY[:1], PLAN, None)
    assert [m["role"] for m in messages] == ["system", "user"] and "get_weather" in messages[0]["content"]
    assert template_inputs(HISTORY[:1], None, None)[0] == HISTORY[:1]  # no tools offered: nothing added


def test_text_chunks_stay_chunks():
    chunks = [{"type": "text", "text": "Be brief."}]
    messages, _ = template_inputs([{"role": "system", "content": chunks}, *HISTORY[:1]], PLAN, None)
    rendered = ChatTemplate(None, None, None).render(messages)
    assert "Be brief.\n\nYou can call" in rendered


def test_a_template_that_only_mentions_tools_gets_them_as_text():
    # Phi-4-mini's reads a system message's own "tools" key, never the `tools` variable: passed as a
    # variable they were dropped unseen, so they are written into the system message as for SmolLM2
    from family_templates import PHI4_MINI

    messages, kwargs = template_inputs(HISTORY[:1], PLAN, PHI4_MINI)
    assert kwargs == {} and "get_weather" in messages[0]["content"]
    rendered = ChatTemplate(PHI4_MINI, "<s>", "</s>").render(messages, **kwargs)
    assert "get_weather" in rendered
