import json

import pytest

from parley.structured import GrammarCompiler, GrammarError
from parley.types import Grammar


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ],
)
def test_unsupported_schema_keyword_is_named(compiler, schema, keyword):
    with pytest.raises(GrammarError, match=keyword):
        compiler.validate(Grammar("json", json.dumps(schema)))


@pytest.mark.parametrize(
    "grammar, message",
    [
        (Grammar("json", "{not json"), "invalid json grammar"),
        (Grammar("json", "[1]"), "invalid json grammar"),
        (Grammar("regex", "a("), "unclosed group"),
        (Grammar("lark", "start: missing_rule"), "missing_rule"),
        (Grammar("yaml", "a: 1"), "unknown grammar kind 'yaml'"),
    ],
)
def test_malformed_grammar_raises(compiler, grammar, message):
    with pytest.raises(GrammarError, match=message):
        compiler.matcher(grammar)


def test_grammar_error_is_a_value_error():
    assert issubclass(GrammarError, ValueError)


def test_matchers_of_one_grammar_are_independent(compiler, backend_tokenizer):
    grammar = Grammar("regex", "(ab)+")
    first, second = compiler.matcher(grammar), compiler.matcher(grammar)
    a = backend_tokenizer.token_to_id("a")
    assert first.accept(a)
    assert not second.accept(backend_tokenizer.token_to_id("b"))  # still at the start
    assert first.accept(backend_tokenizer.token_to_id("b"))


def test_cache_keeps_the_most_recent_grammars(backend_tokenizer, eos_ids):
    compiler = GrammarCompiler(
        backend_tokenizer, eos_ids, backend_tokenizer.get_vocab_size(), cache_size=2
    )
    grammars = [Grammar("regex", pattern) for pattern in ("a", "b", "c")]
    compiler.validate(grammars[0])
    compiled_a = compiler._compiled(grammars[0])
    compiler.validate(grammars[1])
    assert compiler._compiled(grammars[0]) is compiled_a  # a cache hit, and now the most recent
    compiler.validate(grammars[2])  # evicts "b"
    assert list(compiler._cache) == [("regex", "a"), ("regex", "c")]


def test_kind_is_part_of_the_cache_key(compiler, backend_tokenizer):
    matcher = compiler.matcher(
        Grammar("lark", 'start: "x"')
    )  # same text as a regex would mean something else
    assert matcher.accept(backend_tokenizer.token_to_id("x"))


def test_gguf_byte_level_tokenizer_is_read_as_byte_level(compiler, backend_tokenizer):
    """The GGUF tokenizer's decoder is a Sequence(ByteFallback, ..., ByteLevel): "Ġ" must mean a space."""
    assert backend_tokenizer.to_str().count('"ByteFallback"') == 1  # the case being tested
    matcher = compiler.matcher(
        Grammar("json", '{"type": "object", "properties": {"a": {"type": "integer"}}}')
    )
    for token in backend_tokenizer.encode('{"a": 12}', add_special_tokens=False).ids:
        assert matcher.accept(token), matcher.error
    assert matcher.is_terminated()


def _accepts(compiler, backend_tokenizer, grammar: Grammar, text: str) -> bool:
    matcher = compiler.matcher(grammar)
    return all(matcher.accept(t) for t in backend_tokenizer.encode(text, add_special_tokens=False).ids)


def test_strict_json_schema_refuses_properties_the_schema_does_not_name(compiler, backend_tokenizer):
    from parley.api.openai.response_format import response_grammar

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    extra = '{"city": "Paris", "mayor": "x"}'
    for strict, accepted in ((False, True), (True, False)):
        grammar = response_grammar({"type": "json_schema", "json_schema": {"name": "c", "strict": strict,
                                                                          "schema": schema}})
        assert _accepts(compiler, backend_tokenizer, grammar, '{"city": "Paris"}')
        assert _accepts(compiler, backend_tokenizer, grammar, extra) is accepted
