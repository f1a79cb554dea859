"""Random walks through the masks: whatever allowed tokens are picked, the output is valid."""

import json
import re
import statistics
import time

import jsonschema
import pytest

from parley.structured import allocate_bitmask
from parley.types import Grammar

SCHEMAS = {
    "flat_required": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string"},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["person"],
    },
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "all_optional": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "number"}, "c": {"type": "boolean"}},
    },
    "number_range": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0.5, "maximum": 99.5}},
        "required": ["score"],
    },
    "integer_range": {"type": "integer", "minimum": -10, "maximum": 10},
    "exclusive_bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
    "string_pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "closed_object": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "note": {"type": "string"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "maxLength": 8},
                "qty": {"type": "integer", "minimum": 1},
            },
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "maxItems": 3,
    },
    "booleans_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"],
    },
    "any_of": {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "required": ["v"],
    },
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "n": {"type": "integer"}},
        "required": ["kind", "n"],
    },
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 6},
    "matrix": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
        "maxItems": 3,
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
    },
    "nullable_type_list": {
        "type": "object",
        "properties": {"v": {"type": ["string", "null"]}},
        "required": ["v"],
    },
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "boolean"}],
        "items": False,
        "minItems": 3,
    },
    "map_of_integers": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    "formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["day", "id"],
    },
}
SEEDS = range(3)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_walk_output_validates(walk, name, seed):
    schema = SCHEMAS[name]
    text = walk(Grammar("json", json.dumps(schema)), seed)
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_walk_gives_an_object(walk, seed):
    assert isinstance(json.loads(walk(Grammar("json_object"), seed)), dict)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "pattern",
    [
        r"[0-9]{3}-[0-9]{4}",
        r"(yes|no|maybe)",
        r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
        r"[0-9]{1,3}(\.[0-9]{1,3}){3}",
        r"(ab|c)+d?",
    ],
)
def test_regex_walk_output_matches(walk, pattern, seed):
    assert re.fullmatch(pattern, walk(Grammar("regex", pattern), seed))


def test_report_json_timings(compiler, backend_tokenizer):
    """Prints (does not assert) what a JSON schema costs: compile, first mask, later masks."""
    schema = {**SCHEMAS["nested_objects"], "title": "timing"}  # a grammar not cached yet
    document = '{"person": {"name": "Ada", "address": {"city": "London", "zip": "12345"}}}'
    grammar = Grammar("json", json.dumps(schema))
    started = time.perf_counter()
    compiler.validate(grammar)
    compile_ms = (time.perf_counter() - started) * 1e3
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    for run in ("cold", "warm"):  # warm: a second request, sharing the lazily built lexer
        matcher, mask_ms = compiler.matcher(grammar), []
        for token in backend_tokenizer.encode(document, add_special_tokens=False).ids:
            started = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            mask_ms.append((time.perf_counter() - started) * 1e3)
            assert matcher.accept(token)
        print(
            f"\n[timing] json schema ({run}): compile {compile_ms:.2f} ms, first mask {mask_ms[0]:.2f} ms, "
            f"median mask {statistics.median(mask_ms) * 1e3:.0f} us, max {max(mask_ms):.2f} ms "
            f"over {len(mask_ms)} tokens"
        )
