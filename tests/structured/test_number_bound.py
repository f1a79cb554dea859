"""Numbers in JSON outputs carry at most the digits a double holds (17 before the exponent, 3 in
it), whatever the model prefers; the schema's own constraints still hold, and grammars the client
wrote (regex, Lark) are followed as written."""

import json
import re

import jsonschema
import pytest

from parley.types import Grammar

NUMBER = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}
INTEGER = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
# a JSON number, its mantissa digits and its exponent digits
NUMBER_RE = re.compile(r"-?(?P<int>[0-9]+)(\.(?P<frac>[0-9]+))?([eE][+-]?(?P<exp>[0-9]+))?")


def numbers_in(value) -> list[str]:
    """The JSON text of every number in a parsed document."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [json.dumps(value)]
    return []


def assert_bounded(text: str) -> None:
    """Every number written in `text` (outside strings) has at most 17 + 3 digits."""
    outside_strings = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    for match in NUMBER_RE.finditer(outside_strings):
        assert len(match["int"] + (match["frac"] or "")) <= 17 and len(match["exp"] or "") <= 3, text


@pytest.mark.parametrize("schema", [NUMBER, INTEGER, {"type": "array", "items": {"type": "number"}, "maxItems": 3}],
                         ids=["number", "integer", "array"])
def test_digits_stop_at_what_a_double_holds(digit_lover, schema):
    text = digit_lover(Grammar("json", json.dumps(schema)))
    jsonschema.validate(json.loads(text), schema)
    assert_bounded(text)
    assert re.search(r"[0-9]{17}", text)  # the model got the digits it wanted, up to the bound


@pytest.mark.parametrize("grammar", [Grammar("json_object"), Grammar("json", json.dumps({"type": "object"}))],
                         ids=["json_object", "open_object"])
def test_free_values_are_bounded_too(digit_lover, grammar):
    text = digit_lover(grammar, prefix='{"n": 1')
    assert isinstance(json.loads(text), dict)
    assert_bounded(text)


def test_fraction_and_exponent_are_bounded(digit_lover):
    grammar = Grammar("json", json.dumps(NUMBER))
    fraction = digit_lover(grammar, prefix='{"n": 0.')
    assert re.fullmatch(r'\{"n": 0\.[0-9]{16}\}', fraction)  # the leading 0 counts: 17 digits
    exponent = digit_lover(grammar, prefix='{"n": 1.5e-')
    assert re.fullmatch(r'\{"n": 1\.5e-[0-9]{3}\}', exponent)


def test_a_schema_that_needs_more_digits_still_gets_them(digit_lover):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10**17, "maximum": 10**19}},
              "required": ["n"]}
    value = json.loads(digit_lover(Grammar("json", json.dumps(schema))))["n"]
    assert 10**17 <= value <= 10**19  # 18 digits or more: the bound gave way to the schema


def test_digits_in_strings_are_free(digit_lover):
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 40}}, "required": ["s"]}
    text = digit_lover(Grammar("json", json.dumps(schema)), prefix='{"s": "')
    assert re.fullmatch(r'\{"s": "[0-9]{40}"\}', text)


def test_regex_grammars_are_followed_as_written(digit_lover):
    assert re.fullmatch("[0-9]{30}", digit_lover(Grammar("regex", "[0-9]{30}")))
