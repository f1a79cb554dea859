"""Each family's own tool-call format: detected from its real chat template (never falling back to
the default), rendered by that template, parsed whole and streamed, and kept valid by the grammar
and the call bounds."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest

from family_templates import FAMILIES, GRANITE31, MISTRAL_V03, PHI4_MINI, QWEN3
from parley.api.openai.tool_calls import ToolPlan, template_inputs
from parley.structured import allocate_bitmask, bitmask_to_bool
from parley.tokenization.chat_template import ChatTemplate
from parley.tools import (
    DEFAULT_FORMAT,
    ContentDelta,
    ToolCallArgumentsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    detect_format,
    parse_tool_calls,
    tool_call_grammar,
)
from parley.tools.format import GRANITE, LLAMA3_JSON, MISTRAL, QWEN
from tiny_model import CHAT_TEMPLATE

MARKER_ID = 5  # [TOOL_CALLS]'s id in Mistral's v3 vocabulary (stands for <|tool_call|>'s in Granite's too)


def special_ids(tokens):
    return lambda text: MARKER_ID if text in tokens else None


def detected(family: str, special: bool = True):
    _, template, tokens, _, _ = FAMILIES[family]
    return detect_format(ChatTemplate(template, "<s>", "</s>"), special_ids(tokens if special else []))


# A Mistral model whose [TOOL_CALLS] is text, not a special token (as with SmolLM2's vocabulary below).
MISTRAL_TEXT = detected("mistral-v0.3", special=False)
GRANITE_SPECIAL = detected("granite-3.1")  # <|tool_call|> a special token, as in Granite's vocabulary
GRANITE_TEXT = detected("granite-3.1", special=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_template_is_detected_as_its_own_format(family):
    fmt = detected(family)
    assert fmt is not None and fmt is not DEFAULT_FORMAT
    assert fmt.name == FAMILIES[family][4]


def test_detected_formats_write_what_the_templates_write():
    assert detected("qwen2.5") == QWEN
    assert detected("llama3.2") == LLAMA3_JSON and not LLAMA3_JSON.parallel  # its template takes one call a turn
    mistral = detected("mistral-v0.3")
    assert mistral.calls.marker_token == MARKER_ID and mistral.calls.opening == " [" and mistral.id_length == 9
    assert MISTRAL_TEXT.calls.marker_token is None and MISTRAL_TEXT.calls.opening == "[TOOL_CALLS] ["
    granite = detected("granite-3.1")
    assert granite.calls.marker_token == MARKER_ID and granite.calls.opening == "[" and granite.calls.closing == "]"
    assert granite.calls.whole and granite.parallel and granite.id_length is None
    assert GRANITE_TEXT.calls.marker_token is None and GRANITE_TEXT.calls.opening == "<|tool_call|>["


def test_granite_is_detected_by_its_instructions_as_its_template_renders_no_calls():
    template = ChatTemplate(GRANITE31, "<s>", "</s>")
    plan = ToolPlan(TOOLS, "auto", True, None, GRANITE_SPECIAL)
    messages, kwargs = template_inputs(HISTORY, plan, GRANITE31)
    prompt = template.render(messages, **kwargs)
    assert '"Paris"' not in prompt  # the history's call is not rendered: only the instructions name the format
    assert "respond with <|tool_call|> followed by a JSON list of tools used" in prompt
    silent = GRANITE31.replace("respond with <|tool_call|> followed by a JSON list", "respond")
    assert detect_format(ChatTemplate(silent, "<s>", "</s>"), special_ids([])) is None  # nothing else names it


def test_qwen3_is_detected_and_renders_a_call_turn_without_content():
    template = ChatTemplate(QWEN3, "<s>", "</s>")
    assert detect_format(template, special_ids([])) == QWEN
    plan = ToolPlan(TOOLS, "auto", True, None, QWEN)
    messages, kwargs = template_inputs(HISTORY, plan, QWEN3)  # the assistant turn has no content: Qwen3
    prompt = template.render(messages, **kwargs)             # concatenates it, so it must be text
    assert RENDERED_CALL["qwen2.5"] in prompt and "The current weather in a city" in prompt


def test_mistral_without_the_space_after_its_marker():
    template = ChatTemplate(MISTRAL_V03.replace('"[TOOL_CALLS] ["', '"[TOOL_CALLS]["'), "<s>", "</s>")
    fmt = detect_format(template, special_ids(["[TOOL_CALLS]"]))
    assert fmt.name == "mistral" and fmt.calls.opening == "[" and fmt.calls.marker_token == MARKER_ID


def test_templates_that_write_no_known_calls_get_none():
    assert detect_format(ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>"), special_ids([])) is None  # SmolLM2's
    tool_aware = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m['role'] }}{% endfor %}"
    assert detect_format(ChatTemplate(tool_aware, "<s>", "</s>"), special_ids([])) is None
    # Phi-4-mini's renders no calls and names no syntax (it takes the tools in the system message's "tools" key)
    assert detect_format(ChatTemplate(PHI4_MINI, "<s>", "</s>"), special_ids(["<|tool_call|>"])) is None


# -- the family's template renders the tools and the tool turns --------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "abcDEF123", "content": "21 C"}]
RENDERED_CALL = {
    "qwen2.5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3.2": '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral-v0.3": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]',
    # Granite's template renders only the content of each turn: the call turn is empty, the result follows.
    "granite-3.1": "<|start_of_role|>assistant<|end_of_role|><|end_of_text|>\n<|start_of_role|>tool<|end_of_role|>",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_template_renders_the_tools_and_the_history(family):
    template_source = FAMILIES[family][1]
    plan = ToolPlan(TOOLS, "auto", True, None, detected(family))
    messages, kwargs = template_inputs(HISTORY[:1], plan, template_source)
    prompt = ChatTemplate(template_source, "<s>", "</s>").render(messages, **kwargs)
    assert "The current weather in a city" in prompt and '"get_weather"' in prompt
    assert "You can call the functions" not in prompt  # not our prompt: the model's own
    messages, kwargs = template_inputs(HISTORY, plan, template_source)
    prompt = ChatTemplate(template_source, "<s>", "</s>").render(messages, **kwargs)
    assert RENDERED_CALL[family] in prompt and "21 C" in prompt


# -- parsers on hand-written outputs -----------------------------------------------------------------------------
PARIS, NOW = ("get_weather", '{"city":"Paris","days":[1,2]}'), ("now", "{}")
OUTPUTS = {  # format -> [(model output, (content, calls))]
    QWEN: [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>\n'
         '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', ("", [PARIS, NOW])),
        ('Let me check.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', ("Let me check.\n", [NOW])),
        ("No call: a <tool is not one.", ("No call: a <tool is not one.", [])),
        ('<tool_call>\n{"name": "now", "arguments": {}}', ("", [])),  # cut before its end
    ],
    LLAMA3_JSON: [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}', ("", [PARIS])),
        (' {"parameters": {}, "name": "now"}', ("", [NOW])),
        ('The answer is {"a": 1}.', ('The answer is {"a": 1}.', [])),
        ('{"name": "get_weather", "arguments": {}}', ("", [])),  # not Llama's key
        ('{"name": "now", "parameters": {', ("", [])),
    ],
    MISTRAL: [  # [TOOL_CALLS] is a special token: the text has only the list
        (' [{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}, {"name": "now", "arguments": {}}]',
         ("", [PARIS, NOW])),
        ('[{"name": "now", "arguments": {}}]', ("", [NOW])),
        ("[1, 2] is a list.", ("[1, 2] is a list.", [])),
        ('Sure.', ("Sure.", [])),
    ],
    MISTRAL_TEXT: [
        ('[TOOL_CALLS] [{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": '
         '{"city": "Paris", "days": [1, 2]}}]', ("", [NOW, PARIS])),
        ("[TOOL_CALLS is not a call", ("[TOOL_CALLS is not a call", [])),
    ],
    GRANITE_SPECIAL: [  # <|tool_call|> is a special token: the text has only the list
        ('[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}, {"name": "now", "arguments": {}}]',
         ("", [PARIS, NOW])),
        ('\n[{"name": "now", "arguments": {}}]', ("", [NOW])),
        ('[{"name": "now", "arguments": {}}, {"name": "now", "arguments": ', ("", [NOW])),  # the second cut short
        ("[1, 2] is a list.", ("[1, 2] is a list.", [])),
    ],
    GRANITE_TEXT: [
        ('<|tool_call|>[{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": '
         '{"city": "Paris", "days": [1, 2]}}]', ("", [NOW, PARIS])),
        (' <|tool_call|>[{"arguments": {}, "name": "now"}]', ("", [NOW])),
        ("<|tool_call|> is Granite's marker", ("<|tool_call|> is Granite's marker", [])),
        ('Sure: <|tool_call|>[{"name": "now", "arguments": {}}]', ('Sure: <|tool_call|>[{"name": "now", "arguments": {}}]', [])),
    ],
}
CASES = [(fmt, text, expected) for fmt, cases in OUTPUTS.items() for text, expected in cases]
CASE_IDS = [f"{fmt.name}{'_text' if fmt in (MISTRAL_TEXT, GRANITE_TEXT) else ''}-{i}" for i, (fmt, _, _) in enumerate(CASES)]


def streamed(fmt, pieces):
    parser, events = ToolCallStreamParser(fmt), []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    arguments = {start.index: "" for start in starts}
    for e in events:
        if isinstance(e, ToolCallArgumentsDelta):
            arguments[e.index] += e.arguments
    return content, [(start.name, arguments[start.index]) for start in starts], [start.id for start in starts]


@pytest.mark.parametrize("fmt, text, expected", CASES, ids=CASE_IDS)
def test_whole_text_parse(fmt, text, expected):
    content, calls = parse_tool_calls(text, fmt)
    assert (content, [(c.name, c.arguments) for c in calls]) == expected
    id_pattern = r"[A-Za-z0-9]{9}" if fmt.id_length else r"call_[0-9a-f]{24}"
    assert all(re.fullmatch(id_pattern, c.id) for c in calls)


@pytest.mark.parametrize("fmt, text, expected", CASES, ids=CASE_IDS)
def test_stream_split_anywhere_equals_the_whole_text_parse(fmt, text, expected):
    content, calls = expected
    for cut in range(len(text) + 1):  # two pieces, split at every position
        got_content, got_calls, _ = streamed(fmt, [text[:cut], text[cut:]])
        assert got_content == content and got_calls[:len(calls)] == calls, cut
    got_content, got_calls, _ = streamed(fmt, list(text))  # one character at a time
    assert got_content == content and got_calls[:len(calls)] == calls


# -- the grammar in each format: random walks give valid calls (SmolLM2's vocabulary) ------------------------------
WALK_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}},
]
SCHEMAS = {"get_weather": WALK_TOOLS[0]["function"]["parameters"], "now": {"type": "object", "maxProperties": 0}}
WALK_FORMATS = [QWEN, LLAMA3_JSON, MISTRAL_TEXT, GRANITE_TEXT]


def valid(calls):
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return True


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fmt", WALK_FORMATS, ids=lambda f: f.name)
def test_required_and_named_walks_give_valid_calls_in_the_format(walk, fmt, seed):
    text = walk(tool_call_grammar(WALK_TOOLS, "required", True, fmt), seed)
    content, calls = parse_tool_calls(text, fmt)
    assert content == "" and calls and valid(calls), text
    assert text.startswith(fmt.calls.lead + "{"), text  # written exactly as the template writes it
    assert len(calls) == 1 or fmt.parallel
    named = {"type": "function", "function": {"name": "now"}}
    content, calls = parse_tool_calls(walk(tool_call_grammar(WALK_TOOLS, named, True, fmt), seed), fmt)
    assert content == "" and [c.name for c in calls] == ["now"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fmt", WALK_FORMATS, ids=lambda f: f.name)
def test_auto_allows_text_or_calls(walk, fmt, seed):
    text = walk(tool_call_grammar(WALK_TOOLS, "auto", True, fmt), seed, prefix="The weather is", budget=10)
    assert parse_tool_calls(text, fmt) == (text, [])
    lead = fmt.calls.lead if fmt.calls.whole else "Checking." + fmt.calls.lead
    text = walk(tool_call_grammar(WALK_TOOLS, "auto", True, fmt), seed, prefix=lead + "{")
    content, calls = parse_tool_calls(text, fmt)
    assert calls and valid(calls) and content == ("" if fmt.calls.whole else "Checking.")


def test_a_whole_format_answer_may_not_begin_as_a_call_does_without_being_one(compiler, backend_tokenizer):
    matcher = compiler.matcher(tool_call_grammar(WALK_TOOLS, "auto", True, LLAMA3_JSON))
    for token in backend_tokenizer.encode('{"name": "', add_special_tokens=False).ids:
        assert matcher.accept(token)
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    allowed = {backend_tokenizer.decode([t]) for t in bitmask_to_bool(bitmask, compiler.vocab_size)[0].nonzero().flatten().tolist()}
    assert allowed and all(("get_weather".startswith(t) or "now".startswith(t)) for t in allowed), allowed


# -- the call bounds in each format --------------------------------------------------------------------------------
def allowed_after(compiler, backend_tokenizer, grammar, text, max_tokens=None):
    matcher = compiler.matcher(grammar, max_tokens)
    tokens = backend_tokenizer.encode(text, add_special_tokens=False).ids
    for token in tokens:
        assert matcher.accept(token), matcher.error
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return {backend_tokenizer.id_to_token(t) for t in bitmask_to_bool(bitmask, compiler.vocab_size)[0].nonzero().flatten().tolist()}, len(tokens)


NOW_CALL = {QWEN: '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
            MISTRAL_TEXT: '[TOOL_CALLS] [{"name": "now", "arguments": {}}',
            GRANITE_TEXT: '<|tool_call|>[{"name": "now", "arguments": {}}'}
EOS = {"<|im_end|>", "<|endoftext|>"}


@pytest.mark.parametrize("fmt", NOW_CALL, ids=lambda f: f.name)
def test_a_call_that_can_only_repeat_is_not_begun_in_any_format(compiler, backend_tokenizer, fmt):
    allowed, _ = allowed_after(compiler, backend_tokenizer, tool_call_grammar(WALK_TOOLS[1:], "required", True, fmt),
                               NOW_CALL[fmt])
    assert allowed == (EOS if fmt is QWEN else {"]"})  # a second call could only be the same
    allowed, _ = allowed_after(compiler, backend_tokenizer, tool_call_grammar(WALK_TOOLS, "required", True, fmt),
                               NOW_CALL[fmt])
    assert allowed - EOS - {"]"}  # get_weather may follow


@pytest.mark.parametrize("fmt", NOW_CALL, ids=lambda f: f.name)
def test_no_call_is_begun_without_room_in_any_format(compiler, backend_tokenizer, fmt):
    grammar = tool_call_grammar(WALK_TOOLS, "required", True, fmt)
    text = NOW_CALL[fmt].replace("now", "get_weather").replace("{}", '{"city": "Rome"}')
    _, used = allowed_after(compiler, backend_tokenizer, grammar, text)
    closing = 1 if fmt.calls.closing else 0
    longest = used + 1  # the first call, with a token for what goes before the next one
    roomy, _ = allowed_after(compiler, backend_tokenizer, grammar, text, max_tokens=used + longest + 1 + closing)
    tight, _ = allowed_after(compiler, backend_tokenizer, grammar, text, max_tokens=used + longest + closing)
    assert roomy - tight and tight <= EOS | {"]"} and tight


@pytest.mark.parametrize("fmt", WALK_FORMATS, ids=lambda f: f.name)
def test_numbers_in_arguments_are_bounded_in_every_format(digit_lover, fmt):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    text = digit_lover(tool_call_grammar(tools, "required", False, fmt))
    _, calls = parse_tool_calls(text, fmt)
    assert len(calls) == 1 and set(json.loads(calls[0].arguments)) == {"a", "b"}
    assert [len(d) for d in re.findall("[0-9]+", calls[0].arguments)] == [17, 17], calls[0].arguments


def test_a_format_without_parallel_calls_makes_one_even_when_asked_for_more(walk):
    assert not LLAMA3_JSON.parallel
    for seed in range(3):
        _, calls = parse_tool_calls(walk(tool_call_grammar(WALK_TOOLS, "required", True, LLAMA3_JSON), seed), LLAMA3_JSON)
        assert len(calls) == 1


def test_mistral_call_ids_are_what_its_template_accepts():
    ids = {MISTRAL.new_call_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    assert dataclasses.replace(MISTRAL, id_length=None).new_call_id().startswith("call_")


# -- Mistral's marker as its special token (a tiny vocabulary that has one) ---------------------------------------
@pytest.fixture(scope="module")
def marker_vocab():
    """(tokenizer, GrammarCompiler, the Mistral format) for a tiny vocabulary with [TOOL_CALLS] special."""
    from tokenizers import AddedToken

    from parley.structured import GrammarCompiler
    from tiny_model import _train_tokenizer

    tokenizer = _train_tokenizer(400)
    tokenizer.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True, normalized=False)])
    marker = tokenizer.token_to_id("[TOOL_CALLS]")
    eos = tokenizer.token_to_id("<|im_end|>")
    fmt = detect_format(ChatTemplate(MISTRAL_V03, "<s>", "</s>"), lambda text: marker if text == "[TOOL_CALLS]" else None)
    yield tokenizer, GrammarCompiler(tokenizer, [eos], tokenizer.get_vocab_size()), fmt


def test_the_marker_token_opens_the_calls_and_numbers_stay_bounded_after_it(marker_vocab):
    tokenizer, compiler, fmt = marker_vocab
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}}}]
    matcher = compiler.matcher(tool_call_grammar(tools, "required", True, fmt), 200)
    bitmask = allocate_bitmask(1, compiler.vocab_size)

    def allowed():
        matcher.fill_bitmask(bitmask, 0)
        return bitmask_to_bool(bitmask, compiler.vocab_size)[0].nonzero().flatten().tolist()

    assert allowed() == [fmt.calls.marker_token]  # a forced call begins with the special token
    assert matcher.accept(fmt.calls.marker_token)
    for token in tokenizer.encode(' [{"name": "add", "arguments": {"a": 1', add_special_tokens=False).ids:
        assert matcher.accept(token), matcher.error
    digits = [tokenizer.token_to_id(d) for d in "0123456789"]
    for _ in range(16):  # 17 digits in all
        assert set(digits) & set(allowed())
        assert matcher.accept(tokenizer.token_to_id("2"))
    assert not set(digits) & set(allowed())  # the number bound still holds after the special token


def test_no_second_call_without_room_after_the_marker_token(marker_vocab):
    tokenizer, compiler, fmt = marker_vocab
    grammar = tool_call_grammar(WALK_TOOLS, "required", True, fmt)
    text = ' [{"name": "get_weather", "arguments": {"city": "Rome"}}'
    ids = [fmt.calls.marker_token, *tokenizer.encode(text, add_special_tokens=False).ids]

    def allowed_with(max_tokens):
        matcher = compiler.matcher(grammar, max_tokens)
        for token in ids:
            assert matcher.accept(token), matcher.error
        bitmask = allocate_bitmask(1, compiler.vocab_size)
        matcher.fill_bitmask(bitmask, 0)
        return {tokenizer.id_to_token(t) for t in bitmask_to_bool(bitmask, compiler.vocab_size)[0].nonzero().flatten().tolist()}

    longest = len(ids)  # the first call after its marker (it writes no text), plus a token for ", "
    assert any(t.startswith(",") for t in allowed_with(len(ids) + longest + 2))  # a call as long, "]", EOS
    assert allowed_with(len(ids) + longest + 1) == {"]"}  # the list closes; then EOS


@pytest.mark.parametrize("fmt, text", [
    (QWEN, "A <tool_call> that is no call"),  # the parser takes "<tool_call>" for the lead, newline or not
    (DEFAULT_FORMAT, "A <tool_call> that is no call"),
    (LLAMA3_JSON, ' {"a": 1} is JSON'),  # the parser skips the space and takes "{" for a call
    (MISTRAL_TEXT, '\n[TOOL_CALLS] [{'),
    (GRANITE_TEXT, ' <|tool_call|>[{'),
])
def test_auto_free_text_never_looks_like_calls_to_the_parser(compiler, backend_tokenizer, fmt, text):
    matcher = compiler.matcher(tool_call_grammar(WALK_TOOLS, "auto", True, fmt))
    tokens = backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert not all(matcher.accept(token) for token in tokens)
