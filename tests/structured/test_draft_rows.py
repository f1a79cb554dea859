"""GrammarMatcher.fill_draft_rows: the masks a grammar gives each draft position (after the drafts
before it), with the matcher left where it was: the number bound and the tool-call guard included."""

import json

import numpy as np
import pytest

from parley.structured import allocate_bitmask
from parley.structured.calls import allows
from parley.tools import tool_call_grammar
from parley.types import Grammar

BIG = Grammar("json", json.dumps({"type": "object", "required": ["x", "n", "s"], "additionalProperties": False,
                                  "properties": {"x": {"type": "number"}, "s": {"type": "string"},
                                                 "n": {"type": "integer", "minimum": 10**17, "maximum": 10**19}}}))
# x: the bound's 17 digits, then it ends x; n: 19 digits, the bound gives way at the 18th (the schema needs them)
BIG_TEXT = '{"x": 12345678901234567, "s": "a 12", "n": 1234567890123456789}'
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CALLS_TEXT = CALL + "\n" + CALL.replace("Paris", "Rome")


def mask_after(compiler, tokens, make):
    """The mask of make()'s matcher once `tokens` are accepted, as a bitmask row."""
    matcher = make()
    for token in tokens:
        assert matcher.accept(token), matcher.error
    row = allocate_bitmask(1, compiler.vocab_size).numpy()
    matcher.fill_row(row[0])
    return row[0]


@pytest.mark.parametrize("case", ["number bound", "tool calls"])
def test_each_draft_row_is_the_mask_after_the_drafts_before_it(compiler, backend_tokenizer, case):
    if case == "number bound":
        def make():
            return compiler.matcher(BIG)
        text = BIG_TEXT
    else:
        def make():
            return compiler.matcher(tool_call_grammar([WEATHER], "required"), 60)  # the guard counts the tokens left
        text = CALLS_TEXT
    tokens = backend_tokenizer.encode(text, add_special_tokens=False).ids
    wrong = backend_tokenizer.encode("}", add_special_tokens=False).ids[0]
    for start in range(len(tokens)):
        matcher = make()
        for token in tokens[:start]:
            assert matcher.accept(token), matcher.error
        bounded = matcher._numbers is not None
        drafts = tokens[start : start + 6] + [wrong]  # right drafts, then one the grammar refuses there
        rows = allocate_bitmask(len(drafts) + 1, compiler.vocab_size).numpy()
        matcher.fill_draft_rows(drafts, rows)
        right = len(tokens[start : start + 6])
        for i in range(right + 1):
            assert np.array_equal(rows[i], mask_after(compiler, tokens[: start + i], make)), (start, i)
        if right == 6 and not allows(rows[right].view(np.uint32), wrong):  # a refused draft ends the masks: the row after it
            assert (rows[right + 1] == -1).all()                # is left all-allowed
        # the matcher is where it was: its number bound, and its masks through the rest of the text
        assert (matcher._numbers is not None) == bounded
        fresh = make()
        for token in tokens[:start]:
            fresh.accept(token)
        for token in tokens[start:]:
            assert np.array_equal(mask_after(compiler, [], lambda: matcher), mask_after(compiler, [], lambda: fresh))
            assert matcher.accept(token) and fresh.accept(token), matcher.error
    if case == "number bound":  # some drafts above took the bound past where it gives way, and back
        matcher = make()
        assert all(matcher.accept(token) for token in tokens) and matcher._numbers is None
